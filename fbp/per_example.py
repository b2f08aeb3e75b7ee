"""Per-example gradients, their norms and first-order statistics, from one backward pass.

The backward pass of a batch already holds, at every layer, the layer's input ``x`` and the
cotangent ``g = ∂L/∂y`` at its output, one row per example. Per-example quantities are built
from them where each layer's rule runs — no ``vmap(grad)`` over the whole model, no second pass:

* **Weights used like a Dense at many positions** (``fbp.nn.positions``): ``∇_W ℓ_b = X_bᵀ G_b``
  from the inputs ``X_b`` and product cotangents ``G_b`` at the ``T`` positions of example ``b``.
  At one position the norm is ``‖x_b‖ ‖g_b‖`` — without the gradient; otherwise the *ghost norm*
  ``Σ_{t,s} (x_bt·x_bs)(g_bt·g_bs)`` from two ``T×T`` Gram matrices (Li et al., 2022) when
  ``T² (n_in + n_out)`` is smaller than materialising ``T n_in n_out`` (mixed ghost clipping,
  Bu et al., 2023). Layers describe such weights by a ``per_example_positions(res, d_y)`` rule
  beside their backward: Dense (positions: the axes between batch and features),
  SimpleRNN/LSTM/GRU (time steps; ``[x_t, h_{t-1}]`` against the gate cotangents),
  MultiHeadAttention (tokens; four projections), TransformerBlock (its parts'), LayerNorm,
  GroupNorm and LearnedPositionalEmbedding (their per-example gradients directly). Ungrouped
  convolutions use output pixels as positions and the im2col windows one kernel tap at a time.
* **Embedding**: ``‖∇ ℓ_b‖² = Σ_{t,s} [id_bt = id_bs] (g_bt·g_bs)`` (ghost) or the scatter.
* **Every other layer** (grouped or transposed convolutions, a user's own): the layer's own
  rules run on each example alone — ``vmap`` over a batch-of-one forward and backward of *that
  layer only*, from its input and its output cotangent. A user's layer may instead define
  ``per_example_positions`` or ``per_example_grads(res, d_y)`` (``d_params`` with a leading
  batch axis).
* **BatchNorm in training mode** couples the examples of a batch (its statistics are the batch's):
  per-example gradients are not defined, and it raises, suggesting GroupNorm or LayerNorm.

Scaling: ``grads[b]`` is the gradient of the loss on example ``b`` alone (a batch of one), as
JAX's vmap of grad of the per-example loss; ``values`` are the per-example losses.

References:
    Goodfellow, "Efficient Per-Example Gradient Computations", 2015. Li, Tramèr, Liang &
    Hashimoto, "Large Language Models Can Be Strong Differentially Private Learners", ICLR 2022.
    Bu, Wang, Zha & Karypis, "Differentially Private Optimization on Large Model at Small Cost",
    ICML 2023. Dangel, Kunstner & Hennig, "BackPACK: Packing more into Backprop", ICLR 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fbp.core import (
    InputError,
    Layer,
    Loss,
    Wrapper,
    children,
    map_leaf_params,
    require_state,
    require_state_mode,
    run_forward,
    transform_layers,
)
from fbp.nn.conv import _Conv, conv_windows
from fbp.nn.embedding import Embedding
from fbp.nn.norm import BatchNorm
from fbp.nn.positions import Positions, assemble, sq_norm

PyTree = Any
MODES = ("grads", "norms", "clip", "sgs", "kfac-expand", "kfac-reduce")


def _has_params(params) -> bool:
    return any(jnp.issubdtype(a.dtype, jnp.inexact) for a in jax.tree_util.tree_leaves(params))


def _batched(d_y):
    return jax.tree_util.tree_leaves(d_y)[0].shape[0]


# --------------------------------------------------------------------------- per-layer rules
def _conv_positions(layer: Layer, x, d_y) -> Positions | None:
    """Ungrouped convolutions without input dilation as ``Positions``
    (positions: output pixels; one part per kernel tap, the im2col patches never concatenated);
    ``None`` otherwise."""
    bias = ("b",) if getattr(layer, "use_bias", False) else None
    g3 = d_y.reshape(d_y.shape[0], -1, d_y.shape[-1])
    if isinstance(layer, _Conv) and layer.feature_group_count == 1:
        strides, pads, lhs_dilation, rhs_dilation = layer._geometry(x)
        if all(a == 1 for a in lhs_dilation):
            shape = layer._kernel_shape(x)
            parts = conv_windows(x, shape, strides, pads, rhs_dilation, d_y.shape[1:-1])
            return Positions(((("w",), parts, shape),), g3, bias)
    return None


def _layer_positions(layer: Layer, res, x, d_y):
    """``(groups, rest)``: the layer's weights used like a Dense over positions (a list of
    ``Positions``) and its other per-example gradients (``{key: (B, ...)}``), from the
    layer's ``per_example_positions(res, d_y)`` or the convolution rule; ``None`` if neither."""
    own = getattr(layer, "per_example_positions", None)
    if callable(own):
        return own(res, d_y)
    found = _conv_positions(layer, x, d_y)
    return None if found is None else ([found], {})


def _sum_squares(per):
    return jax.tree_util.tree_map(lambda a: jnp.sum(jnp.square(a), axis=0), per)


def _covers(params, groups, rest) -> bool:
    keys = {k for g in groups for k, _, _ in g.kernels} | {g.bias for g in groups if g.bias} | set(rest)
    return len(keys) == sum(jnp.issubdtype(a.dtype, jnp.inexact) for a in jax.tree_util.tree_leaves(params))


def _embedding_sq_norms(layer: Embedding, ids, d_y) -> tuple[jax.Array, str]:
    ids2 = ids.reshape(ids.shape[0], -1)
    g3 = d_y.reshape(d_y.shape[0], -1, d_y.shape[-1])
    t = ids2.shape[1]
    if t * t < layer.vocab:
        same = (ids2[:, :, None] == ids2[:, None, :]).astype(g3.dtype)
        return jnp.sum(same * jnp.einsum("btd,bsd->bts", g3, g3), axis=(1, 2)), f"ghost norm (T={t})"
    table = _embedding_grads(layer, ids, d_y)["table"]
    return jnp.sum(jnp.square(table), axis=(1, 2)), f"materialised (T={t})"


def _embedding_grads(layer: Embedding, ids, d_y):
    ids2 = ids.reshape(ids.shape[0], -1)
    g3 = d_y.reshape(d_y.shape[0], -1, d_y.shape[-1])
    one = jax.vmap(lambda i, g: jnp.zeros((layer.vocab, g.shape[-1]), g.dtype).at[i].add(g, mode="drop"))
    return {"table": one(ids2, g3)}


def _fallback_grads(layer: Layer, params, x, d_y, context):
    """The layer's own forward and backward on each example alone (a batch of one)."""

    def one(x_b, d_y_b):
        add = lambda a: a[None]  # noqa: E731
        _, res = run_forward(layer, params, jax.tree_util.tree_map(add, x_b), **context)
        return layer.backward(res, jax.tree_util.tree_map(add, d_y_b))[0]

    return jax.vmap(one)(x, d_y)


# --------------------------------------------------------------------------- the probe
@dataclasses.dataclass(frozen=True, eq=False)
class _PerExample(Wrapper):
    """``layer`` with per-example quantities returned beside its gradient (through d_params)."""

    layer: Layer
    path: str
    mode: str
    choices: dict = dataclasses.field(default_factory=dict)  # path -> method, filled at trace time
    def forward(self, params, x, *, state=None, key=None, train=False):
        inner_params, _ = params
        if train and isinstance(self.layer, BatchNorm):
            raise InputError(repr(self.layer), "BatchNorm in training mode mixes the examples of a batch (its "
                                               "statistics are the batch's), so per-example gradients are not "
                                               "defined; use GroupNorm or LayerNorm")
        context = {"state": state, "key": key, "train": train} if self.layer.contextual else {}
        y, res = run_forward(self.layer, inner_params, x, **context)
        return y, (res, inner_params, x, context)

    def backward(self, res, d_y):
        inner, params, x, context = res
        d_params, d_x = self.layer.backward(inner, d_y)
        if not _has_params(params):
            return (d_params, None), d_x
        found = _layer_positions(self.layer, inner, x, d_y)
        if found is not None and not _covers(params, *found):
            raise InputError(repr(self.layer), "per_example_positions does not cover every parameter",
                             path=tuple(self.path.split("/")))
        if found is not None:
            out = self._positions(d_params, *found)
        elif isinstance(self.layer, Embedding):
            out = self._embedding(inner, x, d_y)
        else:
            out = self._materialised(inner, params, x, d_y, context)
        return (d_params, out), d_x

    def _positions(self, d_params, groups, rest):
        if self.mode.startswith("kfac"):  # fbp.curvature: Kronecker blocks, the rest as a diagonal
            self.choices[self.path] = [(tuple((key, shape) for key, _, shape in g.kernels), g.bias) for g in groups]
            return {"blocks": [g.kronecker_factors(self.mode[5:]) for g in groups],
                    "diagonal": {k: jnp.sum(jnp.square(v), axis=0) for k, v in rest.items()}}
        if self.mode == "sgs":
            self.choices[self.path] = "(x²)ᵀ(g²)" if all(g.length == 1 for g in groups) else \
                "squares of materialised per-example gradients"
            return assemble(d_params, {k: v for g in groups for k, v in g.sum_squares().items()} |
                            {k: jnp.sum(jnp.square(v), axis=0) for k, v in rest.items()})
        if self.mode == "grads":
            self.choices[self.path] = "outer products over positions" if groups else "the layer's per-example rule"
            return assemble(d_params, {k: v for g in groups for k, v in g.grads().items()} | rest)
        found = [g.sq_norms() for g in groups]
        self.choices[self.path] = ", ".join(dict.fromkeys(how for _, how, _ in found)) or \
            "materialised (the layer's per-example rule)"
        sq = sum((s for s, _, _ in found), sq_norm(rest) if rest else 0.0)
        if self.mode == "clip":  # book-keeping: what the clipped sum's second step reads
            return {"sq": sq, "groups": groups, "per": [per for _, _, per in found], "rest": rest}
        return sq

    def _embedding(self, inner, ids, d_y):
        if self.mode in ("grads", "sgs") or self.mode.startswith("kfac"):
            self.choices[self.path] = [] if self.mode.startswith("kfac") else "scatter per example"
            per = _embedding_grads(self.layer, ids, d_y)
            return per if self.mode == "grads" else _diagonal_only(self.mode, _sum_squares(per))
        sq, self.choices[self.path] = _embedding_sq_norms(self.layer, ids, d_y)
        return {"sq": sq, "res": inner, "d_y": d_y} if self.mode == "clip" else sq

    def _materialised(self, inner, params, x, d_y, context):
        own = getattr(self.layer, "per_example_grads", None)
        if callable(own):
            per, how = own(inner, d_y), "the layer's per_example_grads"
        else:
            per, how = _fallback_grads(self.layer, params, x, d_y, context), "vmap of the layer's rules"
        if self.mode in ("grads", "sgs") or self.mode.startswith("kfac"):
            self.choices[self.path] = [] if self.mode.startswith("kfac") else how
            return per if self.mode == "grads" else _diagonal_only(self.mode, _sum_squares(per))
        self.choices[self.path] = f"materialised ({how})"
        return {"sq": sq_norm(per), "per": per} if self.mode == "clip" else sq_norm(per)


def _diagonal_only(mode, sums):
    """In the K-FAC modes a layer without Kronecker blocks keeps the diagonal ``Σ_b (∇ℓ_b)²``."""
    if not mode.startswith("kfac"):
        return sums
    return {"blocks": [], "tree": sums}  # shaped like the layer's params


def _probe(model: Layer, mode: str, choices: dict) -> Layer:
    return transform_layers(model, lambda path, layer: None if children(layer) else
                            _PerExample(layer, path, mode, choices))


def sum_squares_probe(layer: Layer, path: str) -> Layer:
    """``layer`` (a leaf) as a probe whose params are ``(params, None)`` and whose backward
    returns ``((d_params, Σ_b (∇ℓ_b)²), d_x)`` — the squares of its per-example gradients for
    the cotangent it receives (``fbp.curvature.diag_hessian`` runs it column by column)."""
    return _PerExample(layer, path, "sgs")


def _split(model, d_probed):
    found: dict[str, Any] = {}

    def take(path, leaf, d):
        if d[1] is not None:
            found[path] = d[1]
        return d[0]

    return map_leaf_params(model, d_probed, take), found


def run(model: Layer, loss: Loss, params, x, y, *, mode: str, state=None, key=None, train: bool = True,
        with_pred: bool = False):
    """One forward and one backward pass with per-example probes.

    Returns ``(values, grads, per, choices, new_state)``: per-example losses ``(B,)``; the summed
    gradient ``Σ_b ∇ℓ_b``; ``per[path]``: per-example gradients (``mode="grads"``), squared norms
    (``"norms"``), what the clipped sum reads (``"clip"``: the squared norms with the layer's
    positions, materialised gradients or residuals) or ``Σ_b (∇ℓ_b)²`` (``"sgs"``) for every leaf
    with parameters;
    ``choices[path]``: how each was computed. ``with_pred`` appends the model's output.
    """
    if mode not in MODES:
        raise ValueError(f"per_example.run: mode must be one of {MODES}, got {mode!r}")
    if not hasattr(loss, "reduction") or not dataclasses.is_dataclass(loss):
        raise InputError(repr(loss), "per-example quantities need a loss with a reduction field (its per-example "
                                     "values come from reduction='none')")
    each = dataclasses.replace(loss, reduction="none")
    choices: dict[str, str] = {}
    probed = _probe(model, mode, choices)
    slotted = map_leaf_params(model, params, lambda path, leaf, p: (p, None))
    pred, res = run_forward(probed, slotted, x, state=state, key=key, train=train)
    values, loss_res = each.forward(pred, y)
    d_pred = each.backward(loss_res, jnp.ones(values.shape, values.dtype))  # Σ_b of per-example losses
    grads, per = _split(model, probed.backward(res, d_pred)[0])
    new_state = None if state is None else probed.next_state(state, res)
    return (values, grads, per, choices, new_state) + ((pred,) if with_pred else ())


def backward_columns(model: Layer, params, x, columns: Callable, *, mode: str, gradient: Callable | None = None,
                     state=None, key=None, train: bool = True):
    """One forward pass, then the probed backward once for every column of ``columns(pred)``
    (its last axis: one output cotangent per column, vmapped — the residuals are shared).

    Returns ``(pred, grads, per, choices, new_state)``: ``grads`` and ``per[path]`` with a
    leading column axis (``per`` as in ``run`` for this ``mode``). With ``gradient``
    (``pred -> d_pred``), ``grads`` is instead the gradient from one more backward of that
    cotangent, kept apart from the columns: XLA then drops the columns' own weight gradients,
    which nothing reads. ``fbp.curvature`` backpropagates a loss's Hessian factor this way."""
    if mode not in MODES:
        raise ValueError(f"per_example.backward_columns: mode must be one of {MODES}, got {mode!r}")
    choices: dict[str, Any] = {}
    probed = _probe(model, mode, choices)
    slotted = map_leaf_params(model, params, lambda path, leaf, p: (p, None))
    pred, res = run_forward(probed, slotted, x, state=state, key=key, train=train)
    one = lambda column: _split(model, probed.backward(res, column)[0])  # noqa: E731
    grads, per = jax.vmap(one, in_axes=-1)(columns(pred))
    if gradient is not None:
        grads = one(gradient(pred))[0]
    new_state = None if state is None else probed.next_state(state, res)
    return pred, grads, per, choices, new_state


def with_context(model: Layer, has_state: bool, caller: str, body: Callable) -> Callable:
    """``body(params, x, y, *, state=None, key=None)`` as the public signature:
    ``f(params, x, y, *, key=None)``, or ``f(params, state, x, y, *, key=None)`` for a model that
    keeps state (``has_state=True``, checked against the model and the state passed)."""
    require_state_mode(model, has_state, caller)
    if has_state:
        def with_state(params, state, x, y, *, key=None):
            require_state(model, state, caller)
            return body(params, x, y, state=state, key=key)

        return with_state
    return lambda params, x, y, *, key=None: body(params, x, y, key=key)


def grads(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """Per-example gradients from one backward pass of the batch.

    Args:
        model: the network (BatchNorm in training mode is refused: it mixes the batch).
        loss: the loss; each example's value is its loss on its own.
        has_state: for models that keep state.

    Returns:
        ``f(params, x, y, *, key=None) -> (values, grads)``: ``values`` the per-example losses
        ``(B,)``; every leaf of ``grads`` has a leading batch axis and ``grads[b]`` is the
        gradient of the loss on example ``b`` alone. With ``has_state=True``:
        ``f(params, state, x, y, ...)``.
    """

    def body(params, x, y, **context):
        values, _, per, _, _ = run(model, loss, params, x, y, mode="grads", **context)
        return values, _stacked(model, params, values, per)

    return with_context(model, has_state, "fbp.per_example.grads", body)


def grad_norms(model: Layer, loss: Loss, *, has_state: bool = False, per_layer: bool = False) -> Callable:
    """Per-example gradient norms ``‖g_b‖₂``, without materialising per-example gradients where a
    cheaper route exists (``‖x‖‖g‖`` at one position, the ghost norm; module docstring).

    Args:
        model: the network.
        loss: the loss.
        has_state: for models that keep state.
        per_layer: also return each leaf layer's norms.

    Returns:
        ``f(params, x, y, *, key=None) -> (values, norms)`` with ``norms`` of shape ``(B,)``, the
        L2 norm over all parameters of each example's gradient; with ``per_layer=True``,
        ``(values, norms, layer_norms)``, ``layer_norms[path]`` the ``(B,)`` norms of each leaf
        with parameters. ``routes`` says how each layer's norm is computed.
    """

    def body(params, x, y, **context):
        values, _, per, _, _ = run(model, loss, params, x, y, mode="norms", **context)
        norms = jnp.sqrt(sum(per.values(), jnp.zeros(values.shape, values.dtype)))
        if per_layer:
            return values, norms, {path: jnp.sqrt(sq) for path, sq in per.items()}
        return values, norms

    return with_context(model, has_state, "fbp.per_example.grad_norms", body)


def routes(model: Layer, loss: Loss, params, x, y, *, mode: str = "norms", **context) -> dict[str, str]:
    """How ``grad_norms`` (``mode="norms"``) or ``grads`` (``"grads"``) computes each leaf's
    per-example quantity for inputs shaped like ``x``: ``{"0": "norms ‖x‖‖g‖", "2": "ghost norm
    (T=64)", "3/block": "materialised (vmap of the layer's rules)", ...}``. Traces only (nothing runs).

    Args:
        model: the network.
        loss: the loss.
        params: its parameters (only shapes are read).
        x: an input batch (shapes only).
        y: the targets (shapes only).
        mode: ``"norms"`` or ``"grads"``.

    Returns:
        ``{path: route}`` for every leaf with parameters.
    """
    found: dict[str, str] = {}

    def trace(params, x, y):
        out = run(model, loss, params, x, y, mode=mode, **context)
        found.update(out[3])
        return out[0]

    jax.eval_shape(trace, params, x, y)
    return found


def _stacked(model, params, values, per):
    """``per`` (by leaf path) as a pytree shaped like params, with a leading batch axis."""
    def leaf(path, layer, p):
        if path in per:
            return per[path]
        return jax.tree_util.tree_map(lambda a: jnp.zeros((values.shape[0], *a.shape), a.dtype), p)

    return map_leaf_params(model, params, leaf)


def sum_grad_squared(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """``f(params, x, y, *, key=None) -> Σ_b (∇ℓ_b)²`` elementwise, shaped like params (BackPACK's
    SumGradSquared, for the per-example losses ``ℓ_b``). Each layer squares its own per-example
    gradients in the backward pass (a Dense on ``(B, n)`` as ``(x²)ᵀ(g²)``, never materialising
    them); no per-example gradient of the whole model ever exists.

    Args:
        model: the network.
        loss: the loss.
        has_state: for models that keep state.

    Returns:
        The function above.
    """

    def body(params, x, y, **context):
        return _sgs_and_sum(model, loss, params, x, y, **context)[0]

    return with_context(model, has_state, "fbp.per_example.sum_grad_squared", body)


def variance(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """``f(params, x, y, *, key=None) -> (1/B) Σ_b (∇ℓ_b - ḡ)²`` elementwise, ``ḡ`` the mean
    per-example gradient (BackPACK's Variance, for the per-example losses): ``SGS/B - ḡ²`` from
    the same pass (clamped at 0 against rounding).

    Args:
        model: the network.
        loss: the loss.
        has_state: for models that keep state.

    Returns:
        The function above.
    """

    def body(params, x, y, **context):
        sgs, total, b = _sgs_and_sum(model, loss, params, x, y, **context)
        return jax.tree_util.tree_map(lambda s, g: jnp.maximum(s / b - jnp.square(g / b), 0), sgs, total)

    return with_context(model, has_state, "fbp.per_example.variance", body)


def _sgs_and_sum(model, loss, params, x, y, **context):
    values, total, per, _, _ = run(model, loss, params, x, y, mode="sgs", **context)

    def leaf(path, layer, p):
        return per[path] if path in per else jax.tree_util.tree_map(jnp.zeros_like, p)

    return map_leaf_params(model, params, leaf), total, values.shape[0]
