"""Weights used like a Dense layer at many positions per example: per-example gradients, their
norms and clipped sums from a layer's inputs and output cotangents.

A weight ``W`` applied at ``T`` positions of example ``b`` (the time steps of a recurrent layer,
the tokens of an attention projection, the output pixels of a convolution) has the
per-example gradient

.. math::  \\nabla_W \\ell_b = X_b^\\top G_b = \\sum_t x_{bt} g_{bt}^\\top,

with ``X_b: (T, n_in)`` the inputs it multiplied and ``G_b: (T, n_out)`` the cotangents of its
products. Everything per example follows from ``(X, G)``:

* materialised: ``X_bᵀ G_b`` for every ``b`` — ``T·n_in·n_out`` per example;
* the ghost norm (Li et al., 2022; Bu et al., 2023): ``‖X_bᵀ G_b‖² = Σ_{t,s} (x_t·x_s)(g_t·g_s)``
  from two ``T × T`` Gram matrices — ``T²(n_in + n_out)`` per example, and no per-example
  gradient ever exists;
* a clipped (weighted) sum ``Σ_b c_b X_bᵀ G_b = Xᵀ (c ⊙ G)``: one matmul over all ``B·T`` rows.

A bias beside ``W`` has the per-example gradient ``Σ_t g_bt``. Several kernels may share one
``G`` (an LSTM's ``W_x`` and ``W_h`` both multiply into the gate pre-activations); their inputs
then stack, ``X = [x_t, h_{t-1}]``, and so do their Gram matrices.

A convolution's parts are its kernel taps' shifted windows of one padded input
(``LoopedParts``). Where per-example gradients are kept (returned, or weighed by a clipped sum)
or squared and summed (``sum_squares``), they are made in a loop over the taps, one window live
at a time, each tap's ``(B, n_in, n_out)`` block written straight into its place (the CNN's
second convolution: 17 MiB of temporaries instead of 30.5 at the same time,
``benchmarks/bench_conv_clip_memory.py``; its DP step 59.3 → 46.8 MiB). Norms alone keep all
windows at once (``grads(looped=False)``).

Layers describe such weights with ``Positions`` through a ``per_example_positions(res, d_y)``
method (see ``fbp.per_example``). Keys are tuples into the layer's params
(``("attention", "w_q")`` for nested dicts).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class LoopedParts:
    """Parts of equal width that are slices of one array, made one at a time (a convolution's
    kernel taps, ``fbp.nn.conv_ops.ConvWindows``). Iterating gives every part as an array;
    ``at(i)`` gives part ``i`` for a traced index, so a loop over the parts holds only one.

    Subclasses set ``count`` (how many parts), ``width`` (each part's last axis) and ``dtype``,
    and define ``at``; they are pytrees (their arrays are children)."""

    count: int
    width: int
    dtype: Any

    def at(self, i) -> jax.Array:
        """Part ``i`` (a traced integer), ``(B, T, width)``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return (self.at(i) for i in range(self.count))

    def loop(self, block, init):
        """``init`` with ``block(part_i, i)`` written at each ``i`` by ``block``'s own index
        (``block(part, i) -> (value, start)``, ``lax.dynamic_update_slice``), one part live."""

        def body(i, out):
            value, start = block(self.at(i), i)
            return lax.dynamic_update_slice(out, value, start)

        return lax.fori_loop(0, self.count, body, init)


class Positions(NamedTuple):
    """Kernels that share one output cotangent ``g: (B, T, n_out)``.

    ``kernels``: ``((key, parts, shape), ...)`` — the kernel at ``key`` (a tuple into params)
    has the per-example gradient ``concat(parts, -1)_bᵀ g_b`` reshaped to ``shape``, every part
    ``(B, T, n_k)`` (a convolution's kernel taps are separate parts, never concatenated; they
    may be a ``LoopedParts``, made one at a time).
    ``bias``: the key of the bias whose gradient is ``Σ_t g_bt``, or ``None``."""

    kernels: tuple
    g: jax.Array
    bias: Any = None

    @property
    def length(self) -> int:
        return self.g.shape[1]

    @property
    def fan_in(self) -> int:
        return sum(part.shape[-1] for _, parts, _ in self.kernels for part in parts)

    def ghost_is_cheaper(self, with_grads: bool = True) -> bool:
        """Whether the ghost norm's ``T²(n_in + n_out)`` products beat materialising ``T·n_in·n_out``.

        Without the gradients (``with_grads=False``: norms only) the ghost norm wins up to twice
        the products: its two Gram matrices are large batched products, where materialising
        writes every example's gradient (3C3D's middle convolution, ``T = 144``: 30 ms against
        39 ms at batch 128 on this project's CPU, ``benchmarks/bench_diagnostics.py``)."""
        t, n_out = self.length, self.g.shape[-1]
        return t * t * (self.fan_in + n_out) < (1 if with_grads else 2) * t * self.fan_in * n_out

    def materialises_norms(self, with_grads: bool = True) -> bool:
        """Whether ``sq_norms`` materialises the per-example gradients (several positions, and
        the ghost norm not cheaper)."""
        return self.length > 1 and not self.ghost_is_cheaper(with_grads)

    def _kernel_grads(self, parts, looped: bool = True) -> jax.Array:
        """``(B, Σ n_k, n_out)``: one kernel's per-example gradients; for ``LoopedParts`` (and
        ``looped``) a loop writing each part's block in place, one part live."""
        if looped and isinstance(parts, LoopedParts):
            b, n_out = self.g.shape[0], self.g.shape[-1]
            zeros = jnp.zeros((b, parts.count, parts.width, n_out), jnp.result_type(parts.dtype, self.g.dtype))
            return parts.loop(lambda part, i: (self._block(part)[:, None], (0, i, 0, 0)), zeros).reshape(b, -1, n_out)
        return _rows([self._block(part) for part in parts], axis=1)

    def _block(self, part) -> jax.Array:
        """``(B, n_k, n_out)``: the per-example gradients of one part's rows, ``X_bᵀ G_b``."""
        return jnp.einsum("bti,btj->bij", part, self.g)

    def grads(self, looped: bool = True) -> dict:
        """``{key: (B, *shape)}`` per-example gradients, materialised; ``looped=False`` makes
        ``LoopedParts`` all at once (where only their norms are read: XLA's CPU runtime runs the
        parts' independent products beside the rest of the backward pass, which a loop would
        serialise — the CNN's norms took 1.08-1.14x the time looped, ``bench_per_example.py``)."""
        b = self.g.shape[0]
        out = {key: self._kernel_grads(parts, looped).reshape((b, *shape)) for key, parts, shape in self.kernels}
        if self.bias is not None:
            out[self.bias] = self.g.sum(axis=1)
        return out

    def bias_sq_norm(self):
        return jnp.sum(jnp.square(self.g.sum(axis=1)), axis=1) if self.bias is not None else 0.0

    def sq_norms(self, with_grads: bool = True) -> tuple[jax.Array, str, dict | None]:
        """``(squared norms (B,), route, per-example grads or None)``: ``‖x‖²‖g‖²`` at one position,
        else the ghost norm or materialisation, whichever costs less for these shapes
        (``ghost_is_cheaper``; the grads come back when they were materialised, so a clipped sum
        can weigh them directly; ``with_grads=False`` says nothing will)."""
        parts = [part for _, ps, _ in self.kernels for part in ps]
        if self.length == 1:
            x_sq = sum(jnp.sum(jnp.square(part[:, 0]), 1) for part in parts)
            return x_sq * jnp.sum(jnp.square(self.g[:, 0]), 1) + self.bias_sq_norm(), "norms ‖x‖‖g‖", None
        if not self.materialises_norms(with_grads):
            x_gram = sum(jnp.einsum("bti,bsi->bts", part, part) for part in parts)
            gram = x_gram * jnp.einsum("btj,bsj->bts", self.g, self.g)
            return jnp.sum(gram, axis=(1, 2)) + self.bias_sq_norm(), f"ghost norm (T={self.length})", None
        per = self.grads(looped=with_grads)
        return sq_norm(per), f"materialised (T={self.length})", per

    def sum_squares(self) -> dict:
        """``{key: Σ_b (X_bᵀ G_b)²}`` elementwise (BackPACK's SumGradSquared). At one position it
        is ``(x²)ᵀ (g²)`` — one matmul, no per-example gradient; otherwise the per-example
        gradients of this layer are materialised and squared one part (kernel tap) at a time,
        the small sums concatenated: never the whole per-example gradient (concatenating it
        cost 4× the squares at 3C3D's last convolution, ``benchmarks/bench_diagnostics.py``)."""
        if self.length > 1:
            out = {key: _part_squares(parts, self.g).reshape(shape) for key, parts, shape in self.kernels}
            if self.bias is not None:
                out[self.bias] = jnp.sum(jnp.square(self.g.sum(axis=1)), axis=0)
            return out
        g2 = jnp.square(self.g[:, 0])
        out = {key: _rows([jnp.square(part[:, 0]).T @ g2 for part in parts]).reshape(shape)
               for key, parts, shape in self.kernels}
        if self.bias is not None:
            out[self.bias] = g2.sum(axis=0)
        return out

    def column_squares(self) -> dict:
        """``sum_squares`` left unmultiplied, for a backward vmapped over the columns of a loss's
        Hessian factor (``sum_columns`` finishes it after the vmap): each kernel's
        ``ColumnSquares`` of its inputs and the cotangent (the bias' squares summed as usual).

        At one position ``ColumnSquares.total`` sums the columns' ``g²`` before the one product,
        ``(x²)ᵀ (Σ_c g_c²)`` (the order BackPACK's DiagGGN contracts in), where the vmapped
        ``(x²)ᵀ(g_c²)`` would be one product per column. At several, a convolution's taps
        (``LoopedParts``, or several narrow parts) become one im2col matrix multiplied by all
        columns' cotangents at once, ``X_bᵀ [G_b¹ … G_bᶜ]``: per example one product with
        ``taps · C_in`` rows and ``C`` times as many columns, instead of ``C · taps`` narrow
        ones (the CNN's exact GGN diagonal: 0.66–0.67 of the time, ``docs/performance.md``).
        Other kernels (a Dense over tokens, an LSTM's) stay in the vmap: there the wide form
        took 1.5× the time."""
        if self.length == 1:
            g2 = jnp.square(self.g[:, 0])
            out = {key: ColumnSquares(tuple(jnp.square(part[:, 0]) for part in parts), g2, tuple(shape))
                   for key, parts, shape in self.kernels}
            if self.bias is not None:
                out[self.bias] = g2.sum(axis=0)
            return out
        out = {key: ColumnSquares(parts, self.g, tuple(shape), positions=True) if _taps(parts)
               else _part_squares(parts, self.g).reshape(shape) for key, parts, shape in self.kernels}
        if self.bias is not None:
            out[self.bias] = jnp.sum(jnp.square(self.g.sum(axis=1)), axis=0)
        return out

    def kronecker_factors(self, approximation: str = "expand") -> tuple[jax.Array, jax.Array]:
        """K-FAC's ``(A, G)`` for these kernels as one matrix ``W: (fan_in [+1], n_out)`` (the
        kernels' rows stacked in order, then the bias as a last row of inputs 1), so that
        ``Σ_b vec(∇_W ℓ_b) vec(∇_W ℓ_b)ᵀ ≈ A ⊗ G`` (row-major ``vec``). With ``a_bt`` the inputs
        and ``g_bt`` the cotangents at the ``T`` positions (Eschenhagen et al., 2023):

        * ``"expand"``: ``A = (1/(B T)) Σ_{b,t} a_bt a_btᵀ``, ``G = Σ_{b,t} g_bt g_btᵀ`` — positions
          treated as examples (the right one when the loss has a term per position);
        * ``"reduce"``: ``A = (1/B) Σ_b ā_b ā_bᵀ`` with ``ā_b`` the mean over positions and
          ``G = Σ_b ĝ_b ĝ_bᵀ`` with ``ĝ_b`` the sum (one loss term per example).

        At one position both are the exact Kronecker form ``a aᵀ ⊗ g gᵀ`` summed over ``b``
        (with ``A`` averaged)."""
        a = jnp.concatenate([part for _, parts, _ in self.kernels for part in parts], axis=-1)
        if self.bias is not None:
            a = jnp.concatenate([a, jnp.ones((*a.shape[:-1], 1), a.dtype)], axis=-1)
        b, t = a.shape[:2]
        if approximation == "expand":  # as 2-D products: XLA's CPU einsum over (b, t) is several times slower
            a2, g2 = a.reshape(b * t, -1), self.g.reshape(b * t, -1)
            return a2.T @ a2 / (b * t), g2.T @ g2
        a_mean, g_sum = a.mean(axis=1), self.g.sum(axis=1)
        return a_mean.T @ a_mean / b, g_sum.T @ g_sum

    def dots(self, direction) -> jax.Array:
        """``(B,)``: each example's ``⟨∇ℓ_b, V⟩`` over these kernels (and bias), as
        ``Σ_t x_btᵀ V g_bt`` — ``G Vᵀ`` is one product shaped like the forward's, and no
        per-example gradient exists. ``direction(key)`` is ``V`` at that key (its param's shape)."""
        out = jnp.zeros(self.g.shape[:1], self.g.dtype)
        for key, parts, _ in self.kernels:
            gv = jnp.einsum("btj,ij->bti", self.g, direction(key).reshape(-1, self.g.shape[-1]))
            offset = 0
            for part in parts:
                n = part.shape[-1]
                out = out + jnp.einsum("bti,bti->b", part, gv[..., offset:offset + n])
                offset += n
        if self.bias is not None:
            out = out + self.g.sum(axis=1) @ direction(self.bias)
        return out

    def sample(self, key, count: int):
        """About ``count`` per-example gradient elements of each kernel drawn uniformly, without
        the per-example gradient: element ``(b, i, j)`` of a part is ``Σ_t x_bti g_btj``
        (``count × T`` products; each part gets its share of ``count`` by its width).

        Args:
            key: the random key.
            count: how many elements per kernel.

        Returns:
            ``[(key, values, examples, rows, cols, weight)]`` per part of each kernel: values of
            the examples at rows and columns of the kernel as a ``(fan_in, n_out)`` matrix, and
            ``weight`` = the part's per-example elements over its draws, so that weighted
            counts estimate the kernel's histogram.
        """
        out = []
        b, _, n_out = self.g.shape
        g_t = self.g.swapaxes(1, 2)  # (B, n_out, T): each drawn (example, column) reads T contiguous values
        for k, (kernel, parts, _) in enumerate(self.kernels):
            fan_in, offset = sum(part.shape[-1] for part in parts), 0
            for n, part in enumerate(parts):
                width = part.shape[-1]
                draws = max(1, -(-count * width // fan_in))
                keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, k), n), 3)
                ex = jax.random.randint(keys[0], (draws,), 0, b)
                row = jax.random.randint(keys[1], (draws,), 0, width)
                col = jax.random.randint(keys[2], (draws,), 0, n_out)
                values = jnp.sum(part.swapaxes(1, 2)[ex, row] * g_t[ex, col], axis=1)
                out.append((kernel, values, ex, row + offset, col, b * width * n_out / draws))
                offset += width
        return out

    def weighted_sum(self, c) -> dict:
        """``{key: Σ_b c_b X_bᵀ G_b}`` (and the bias ``Σ_b c_b Σ_t g_bt``) as ``Xᵀ (c ⊙ G)``."""
        g = (self.g * c.astype(self.g.dtype)[:, None, None]).reshape(-1, self.g.shape[-1])  # (B·T, n_out)
        out = {key: _rows([part.reshape(-1, part.shape[-1]).T @ g for part in parts]).reshape(shape)
               for key, parts, shape in self.kernels}
        if self.bias is not None:
            out[self.bias] = g.sum(axis=0)
        return out


@jax.tree_util.register_pytree_node_class
class ColumnSquares:
    """One kernel's ``Σ_b (∇_W ℓ_b)²`` from its inputs and cotangent, not yet multiplied
    (``Positions.column_squares``), carried out of a backward vmapped over columns.

    Attributes:
        parts: at one position the inputs' squares ``x²``, one ``(B, n_k)`` array per part; at
            several (``positions=True``) the parts themselves, ``(B, T, n_k)`` arrays or a
            ``LoopedParts``. After the column vmap every array has a leading column axis, along
            which it is the same (the inputs do not depend on the column).
        g2: at one position the cotangent's squares ``(B, n_out)``; at several the cotangent
            ``(B, T, n_out)`` (after the vmap ``(C, ...)``).
        shape: the kernel's shape.
        positions: several positions.
    """

    def __init__(self, parts, g2, shape, positions=False):
        self.parts, self.g2, self.shape, self.positions = parts, g2, shape, positions

    def tree_flatten(self):
        return (self.parts, self.g2), (self.shape, self.positions)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def total(self) -> jax.Array:
        """``Σ_c Σ_b (∇_W ℓ_b^c)²`` from the vmapped arrays. One position: ``(x²)ᵀ (Σ_c g_c²)``,
        one product. Several (a convolution's taps): ``Σ_b (X_bᵀ [G_b¹ … G_bᶜ])²`` summed over
        the columns. From ``IM2COL_COLUMNS`` columns on (or for narrow list parts) the taps are
        one im2col matrix ``X_b`` and the batch goes in chunks of up to ``COLUMN_CHUNK``
        examples (a ``scan``): each example's product is then ``taps · C_in`` rows tall instead
        of ``C_in`` — at the CNN's second convolution with 10 columns 0.62–0.64 of the time of
        one tap at a time (scratch comparison, 2 cores). With fewer columns a ``LoopedParts``
        goes one tap at a time (the im2col matrix cost more than it saved there)."""
        parts = jax.tree_util.tree_map(lambda a: a[0], self.parts)  # the same for every column
        if not self.positions:
            g2 = jnp.sum(self.g2, axis=0)
            return _rows([part.T @ g2 for part in parts]).reshape(self.shape)
        c, b, t, n_out = self.g2.shape
        wide = jnp.moveaxis(self.g2, 0, 2).reshape(b, t, c * n_out)  # [G_b¹ … G_bᶜ], laid out once
        if c < IM2COL_COLUMNS and isinstance(parts, LoopedParts):  # few columns: one tap at a time
            return _part_squares(parts, wide).reshape(-1, c, n_out).sum(axis=1).reshape(self.shape)
        patches = _rows(list(parts), axis=-1)  # (B, T, K)
        chunk = max(d for d in range(1, min(COLUMN_CHUNK, b) + 1) if b % d == 0)

        dtype = jnp.result_type(patches.dtype, wide.dtype)
        acc = jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else dtype  # half precision: sums in float32

        def add(total, rows):
            return total + batch_sum_squares(jnp.einsum("bti,btj->bij", *rows), acc), None

        k = patches.shape[-1]
        total, _ = lax.scan(add, jnp.zeros((k, c * n_out), acc), (patches.reshape(b // chunk, chunk, t, k),
                                                                  wide.reshape(b // chunk, chunk, t, c * n_out)))
        return total.reshape(k, c, n_out).sum(axis=1).astype(dtype).reshape(self.shape)


IM2COL_COLUMNS = 8  # from this many columns on, ColumnSquares.total multiplies one im2col matrix
COLUMN_CHUNK = 8  # examples per product in ColumnSquares.total (8 and 16: 0.62-0.64 of one tap at a time; 32: 0.70)


NARROW = 64  # parts this wide together are multiplied as one matrix (fbp.nn.conv_ops.IM2COL_MAX_WIDTH)


def _taps(parts) -> bool:
    """Whether a kernel's parts are a convolution's taps: ``LoopedParts``, or several narrow parts."""
    return isinstance(parts, LoopedParts) or (len(parts) > 1 and sum(p.shape[-1] for p in parts) <= NARROW)


def sum_columns(quantity):
    """A column-vmapped ``"sgs"`` quantity summed over its leading column axis, each
    ``ColumnSquares`` by its one product.

    Args:
        quantity: a probe's ``"sgs-columns"`` output from a backward vmapped over columns.

    Returns:
        The same tree with the column axis summed away (``ColumnSquares`` become arrays).
    """
    return jax.tree_util.tree_map(lambda a: a.total() if isinstance(a, ColumnSquares) else jnp.sum(a, axis=0),
                                  quantity, is_leaf=lambda a: isinstance(a, ColumnSquares))


def _part_squares(parts, g) -> jax.Array:
    """``(Σ n_k, n_out)``: ``Σ_b (X_bᵀ G_b)²`` part by part for ``g: (B, T, n_out)``; a
    ``LoopedParts`` in a loop writing each part's ``(n_k, n_out)`` sum in place."""
    if isinstance(parts, LoopedParts):
        zeros = jnp.zeros((parts.count, parts.width, g.shape[-1]), jnp.result_type(parts.dtype, g.dtype))
        squares = lambda part, i: (batch_sum_squares(jnp.einsum("bti,btj->bij", part, g))[None], (i, 0, 0))  # noqa: E731
        return parts.loop(squares, zeros).reshape(-1, g.shape[-1])
    return _rows([batch_sum_squares(jnp.einsum("bti,btj->bij", p, g)) for p in parts])


def batch_sum_squares(a, dtype=None) -> jax.Array:
    """``Σ_b a_b²`` over the leading axis, as the product ``1ᵀ (a²)``: XLA's CPU runtime reduced
    a batch of per-example gradients ``(128, 32, 640)`` over its leading axis in 8 ms, the
    product with ones in under 1 ms (2 cores; the CNN's exact GGN diagonal, ``bench_curvature.py``).

    Args:
        a: ``(B, ...)``.
        dtype: the result's dtype (default ``a``'s); half precision sums in float32 either way.

    Returns:
        ``a.shape[1:]``.
    """
    flat = jnp.square(a).reshape(a.shape[0], -1)
    wide = jnp.float32 if a.dtype in (jnp.bfloat16, jnp.float16) else None
    total = jnp.matmul(jnp.ones((a.shape[0],), a.dtype), flat, preferred_element_type=wide)
    return total.astype(dtype or a.dtype).reshape(a.shape[1:])


def _rows(blocks: list, axis: int = 0):
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=axis)


def sq_norm(per: dict) -> jax.Array:
    """Per-example squared norms of a dict (or pytree) of per-example arrays.

    Args:
        per: a pytree of ``(B, ...)`` arrays (integer leaves are left out).

    Returns:
        ``(B,)``: Σ of each example's squared entries over all leaves.
    """
    leaves = [a for a in jax.tree_util.tree_leaves(per) if jnp.issubdtype(a.dtype, jnp.inexact)]
    return sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1) for a in leaves)


def batch_major(a):
    """Swap a time-major array to batch-major.

    Args:
        a: ``(T, B, ...)``.

    Returns:
        ``(B, T, ...)``.
    """
    return a.swapaxes(0, 1)


def assemble(template, values: dict):
    """A params-shaped dict with some entries replaced.

    Args:
        template: a params-shaped (nested) dict.
        values: ``{key or key tuple: value}``; a tuple addresses a nested entry.

    Returns:
        A copy of ``template`` with those entries replaced (``template`` is not changed).
    """
    out = dict(template)
    for key, value in values.items():
        key = key if isinstance(key, tuple) else (key,)
        if len(key) == 1:
            out[key[0]] = value
        else:
            out[key[0]] = assemble(out[key[0]], {key[1:]: value})
    return out
