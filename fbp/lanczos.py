r"""The Lanczos iteration on a symmetric operator given only by its products ``v ↦ A v``.

``k`` steps from a unit start vector ``q_1`` build an orthonormal basis ``Q = [q_1 … q_k]`` of
the Krylov space ``span{q_1, A q_1, …, A^{k-1} q_1}`` and the tridiagonal ``T = Qᵀ A Q`` with
diagonal ``α`` and off-diagonal ``β`` (Lanczos, 1950). With ``T = U diag(θ) Uᵀ``:

* the **Ritz values** ``θ`` approximate the extreme eigenvalues of ``A`` from inside; the Ritz
  pair ``(θ_i, Q u_i)`` has the residual ``‖A Q u_i − θ_i Q u_i‖ = β_k |u_{k,i}|`` — an error
  bound read off the iteration (Parlett, *The Symmetric Eigenvalue Problem*, §13.1);
* the **Gauss quadrature** ``q_1ᵀ f(A) q_1 ≈ Σ_i u_{1,i}² f(θ_i)`` is exact for polynomials of
  degree ``≤ 2k − 1`` (Golub & Meurant, 2010), the basis of stochastic Lanczos quadrature
  (``fbp.spectrum.density``).

Each step subtracts the three-term recurrence ``α_i q_i + β_{i−1} q_{i−1}`` and then, with
``reorthogonalize=True`` (the default), projects out every earlier basis vector once more — full
reorthogonalisation, which keeps ``Q`` orthonormal in floating point (Parlett, §13.8) at the cost
of reading the ``k × dim`` basis twice per step; for millions of parameters that costs more than
the product itself. Without it, only the recurrence: the extreme Ritz values still converge (lost
orthogonality shows as repeated copies of converged ones), at ``O(dim)`` per step and with two
vectors in memory instead of the basis (so no Ritz vectors). When the
residual falls to rounding an invariant subspace has been found: the iteration stops there and
the later rows of ``T`` are zero (their Ritz values are 0 with quadrature weight 0).

**Vectors as pytrees.** The vectors may be flat ``(dim,)`` arrays or any pytree of arrays
(``like=``: a network's parameters, say), on which ``matvec`` acts directly. A curvature product
takes and returns parameter-shaped trees; running the iteration on them avoids flattening every
product's result into one vector and slicing every direction back (two copies of all ``dim``
entries a step). On a 2.9M-parameter MLP that was a third of a 20-step run
(``benchmarks/bench_curvature_uses.py --part spectrum``).

**The random start** is a Rademacher vector ``z/√dim`` with ``z ∈ {±1}^dim``, its signs the bits
of ``⌈dim/32⌉`` 32-bit Threefry words (``rademacher``): every bit of the stream is a fair coin
independent of the others, so this is the same distribution as ``jax.random.rademacher``, which
spends one word per sign — the draw then costs ~1/32 of the cipher evaluations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.validation import typed_arguments

_leaves = jax.tree_util.tree_leaves
_map = jax.tree_util.tree_map


class Tridiagonal(NamedTuple):
    """``lanczos``' result: ``alphas (k,)``, ``betas (k,)`` (``betas[i]`` couples steps ``i`` and
    ``i + 1``; ``betas[k-1]`` is the last residual's norm) and the basis: ``(k, dim)`` for flat
    vectors, or the vectors' pytree with a leading ``k`` axis on every leaf (``None`` without
    reorthogonalisation: then only two vectors are kept)."""

    alphas: jax.Array
    betas: jax.Array
    basis: Any

    def matrix(self) -> jax.Array:
        """``T``, ``(k, k)``."""
        b = self.betas[:-1]
        return jnp.diag(self.alphas) + jnp.diag(b, 1) + jnp.diag(b, -1)

    def ritz(self):
        """``(θ, U, residuals)``: Ritz values ascending, ``T``'s eigenvectors, and the residual
        norms ``β_k |u_{k,i}|`` of the Ritz pairs."""
        values, vectors = jnp.linalg.eigh(self.matrix())
        return values, vectors, jnp.abs(self.betas[-1] * vectors[-1])

    def quadrature(self):
        """``(nodes, weights)``: Gauss quadrature for ``q_1ᵀ f(A) q_1`` (weights sum to 1)."""
        values, vectors = jnp.linalg.eigh(self.matrix())
        return values, jnp.square(vectors[0])

    def combine(self, coefficients):
        """``Q c``: for ``c (k,)`` one vector, for ``c (k, m)`` the ``m`` vectors stacked first
        (``(m, dim)``, or each leaf ``(m, *shape)``) — Ritz vectors from ``U``'s columns."""
        c = jnp.asarray(coefficients)
        return _map(lambda b: jnp.tensordot(c.T, b, axes=1).astype(b.dtype), self.basis)


def rademacher(key, like, dtype=None):
    """Independent ±1 entries shaped like ``like`` (a pytree of arrays or shape-dtype structs),
    32 per Threefry word (module docstring). The entries fill the leaves in order, so a flat
    ``(dim,)`` draw and a pytree draw of the same total size agree entry for entry.

    Args:
        key: the random key.
        like: the pytree whose structure, shapes (and dtypes) the signs take.
        dtype: the entries' dtype (default: each leaf's own).

    Returns:
        The signs, a pytree like ``like``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [math.prod(np.shape(a)) for a in leaves]
    total = sum(sizes)
    bits = jax.random.bits(key, (-(-total // 32),), jnp.uint32)
    signs = ((bits[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).reshape(-1)[:total]
    offsets = np.cumsum([0, *sizes])
    out = [(1 - 2 * signs[a:b].astype(dtype or leaf.dtype)).reshape(np.shape(leaf))
           for leaf, a, b in zip(leaves, offsets[:-1], offsets[1:], strict=True)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _dot(a, b, dtype):
    """``⟨a, b⟩`` of two vectors (flat arrays or pytrees alike), accumulated in ``dtype``."""
    return sum((jnp.vdot(u, w).astype(dtype) for u, w in zip(_leaves(a), _leaves(b), strict=True)),
               jnp.zeros((), dtype))


def _scaled(v, s):
    return _map(lambda a: (a * s).astype(a.dtype), v)


@typed_arguments
def lanczos(matvec, dim: int, iterations: int, key, dtype, start=None, reorthogonalize: bool = True, *,
            like=None) -> Tridiagonal:
    """``iterations`` Lanczos steps with full reorthogonalisation (module docstring).

    Args:
        matvec: ``v -> A v`` on the vectors (flat, or pytrees like ``like``).
        dim: the dimension (with ``like``, the total size of its leaves).
        iterations: ``k`` (at most ``dim``).
        key: the random start vector's key.
        dtype: the vectors' dtype (with ``like``: the dtype of the dot products).
        start: a start vector (normalised here), or ``None``; a zero one falls back to random.
        reorthogonalize: project out every earlier basis vector at each step (module docstring).
        like: ``None`` (flat ``(dim,)`` vectors of ``dtype``) or a pytree of arrays or
            ``jax.ShapeDtypeStruct``: the vectors' structure, shapes and dtypes.

    Returns:
        A ``Tridiagonal``.
    """
    if dim < 1 or iterations < 1:
        raise ValueError(f"fbp.lanczos.lanczos: dim and iterations must be at least 1, got dim={dim}, "
                         f"iterations={iterations}")
    like = jax.ShapeDtypeStruct((dim,), dtype) if like is None else like
    held = sum(math.prod(np.shape(a)) for a in _leaves(like))
    if held != dim:
        raise ValueError(f"fbp.lanczos.lanczos: like's leaves hold {held} entries, not dim={dim}")
    k = min(int(iterations), dim)
    v0 = _scaled(rademacher(key, like), 1 / math.sqrt(dim))  # unit length
    if start is not None:
        norm = jnp.sqrt(_dot(start, start, dtype))
        safe = jnp.where(norm > 0, norm, 1)
        v0 = _map(lambda s, r: jnp.where(norm > 0, s / safe, r).astype(r.dtype), start, v0)
    if not reorthogonalize:
        return _three_term(matvec, v0, k, dtype)
    basis = _map(lambda a: jnp.zeros((k + 1, *a.shape), a.dtype).at[0].set(a), v0)

    def body(i, carry):
        basis, alphas, betas, scale = carry
        current, previous = _map(lambda b: b[i], basis), _map(lambda b: b[i - 1], basis)  # i = 0: the zero last row
        w = matvec(current)
        alpha = _dot(w, current, dtype)
        w = _map(lambda a, c, p: (a - alpha * c - betas[i - 1] * p).astype(a.dtype), w, current, previous)
        h = sum(jnp.tensordot(b, a, axes=a.ndim).astype(dtype) for b, a in zip(_leaves(basis), _leaves(w), strict=True))
        w = _map(lambda a, b: (a - jnp.tensordot(h, b, axes=1)).astype(a.dtype), w, basis)  # every earlier vector
        beta = jnp.sqrt(_dot(w, w, dtype))
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        found = beta > 100 * jnp.finfo(dtype).eps * scale  # else an invariant subspace: stop (zero rows)
        inverse = jnp.where(found, 1 / jnp.where(found, beta, 1), 0)
        basis = _map(lambda b, a: b.at[i + 1].set((a * inverse).astype(b.dtype)), basis, w)
        return basis, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(found, beta, 0)), scale

    basis, alphas, betas, _ = jax.lax.fori_loop(0, k, body, (basis, jnp.zeros((k,), dtype),
                                                             jnp.zeros((k,), dtype), jnp.zeros((), dtype)))
    return Tridiagonal(alphas, betas, _map(lambda b: b[:k], basis))


def _three_term(matvec, v0, k, dtype) -> Tridiagonal:
    """Lanczos without reorthogonalisation: two vectors in the carry, no basis (``basis`` is ``None``)."""

    def body(i, carry):
        previous, current, alphas, betas, scale = carry
        w = matvec(current)
        alpha = _dot(w, current, dtype)
        w = _map(lambda a, c, p: (a - alpha * c - betas[i - 1] * p).astype(a.dtype), w, current, previous)
        beta = jnp.sqrt(_dot(w, w, dtype))
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        found = beta > 100 * jnp.finfo(dtype).eps * scale
        following = _scaled(w, jnp.where(found, 1 / jnp.where(found, beta, 1), 0))
        return current, following, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(found, beta, 0)), scale

    zeros = jnp.zeros((k,), dtype)
    _, _, alphas, betas, _ = jax.lax.fori_loop(0, k, body, (_map(jnp.zeros_like, v0), v0, zeros, zeros,
                                                            jnp.zeros((), dtype)))
    return Tridiagonal(alphas, betas, None)


__all__ = ["Tridiagonal", "lanczos", "rademacher"]
