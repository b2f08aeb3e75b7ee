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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.validation import typed_arguments


class Tridiagonal(NamedTuple):
    """``lanczos``' result: ``alphas (k,)``, ``betas (k,)`` (``betas[i]`` couples steps ``i`` and
    ``i + 1``; ``betas[k-1]`` is the last residual's norm) and the basis ``(k, dim)`` (``None``
    without reorthogonalisation: then only two vectors are kept)."""

    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array

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


@typed_arguments
def lanczos(matvec, dim: int, iterations: int, key, dtype, start=None, reorthogonalize: bool = True) -> Tridiagonal:
    """``iterations`` Lanczos steps with full reorthogonalisation (module docstring).

    Args:
        matvec: ``v -> A v`` on flat vectors of length ``dim`` (``A`` symmetric).
        dim: the dimension.
        iterations: ``k`` (at most ``dim``).
        key: the random start vector's key.
        dtype: the vectors' dtype.
        start: a start vector (normalised here), or ``None``; a zero one falls back to random.
        reorthogonalize: project out every earlier basis vector at each step (module docstring).

    Returns:
        A ``Tridiagonal``.
    """
    if dim < 1 or iterations < 1:
        raise ValueError(f"fbp.lanczos.lanczos: dim and iterations must be at least 1, got dim={dim}, "
                         f"iterations={iterations}")
    k = min(int(iterations), dim)
    v0 = jax.random.normal(key, (dim,), dtype)
    if start is not None:
        v0 = jnp.where(jnp.linalg.norm(start) > 0, start.astype(dtype), v0)
    v0 = v0 / jnp.linalg.norm(v0)
    if not reorthogonalize:
        return _three_term(matvec, v0, k, dtype)
    basis = jnp.zeros((k + 1, dim), dtype).at[0].set(v0)

    def body(i, carry):
        basis, alphas, betas, scale = carry
        w = matvec(basis[i])
        alpha = jnp.dot(w, basis[i])
        w = w - alpha * basis[i] - betas[i - 1] * basis[i - 1]  # at i = 0 both are zero (the last row, the last β)
        w = w - basis.T @ (basis @ w)  # against every earlier vector (rows beyond i are zero)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        found = beta > 100 * jnp.finfo(dtype).eps * scale  # else an invariant subspace: stop (zero rows)
        basis = basis.at[i + 1].set(jnp.where(found, w / jnp.where(found, beta, 1), 0))
        return basis, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(found, beta, 0)), scale

    basis, alphas, betas, _ = jax.lax.fori_loop(0, k, body, (basis, jnp.zeros((k,), dtype),
                                                             jnp.zeros((k,), dtype), jnp.zeros((), dtype)))
    return Tridiagonal(alphas, betas, basis[:k])


def _three_term(matvec, v0, k, dtype) -> Tridiagonal:
    """Lanczos without reorthogonalisation: two vectors in the carry, no basis (``basis`` is ``None``)."""

    def body(i, carry):
        previous, current, alphas, betas, scale = carry
        w = matvec(current)
        alpha = jnp.dot(w, current)
        w = w - alpha * current - betas[i - 1] * previous
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        found = beta > 100 * jnp.finfo(dtype).eps * scale
        following = jnp.where(found, w / jnp.where(found, beta, 1), 0)
        return current, following, alphas.at[i].set(alpha), betas.at[i].set(jnp.where(found, beta, 0)), scale

    zeros = jnp.zeros((k,), dtype)
    _, _, alphas, betas, _ = jax.lax.fori_loop(0, k, body, (jnp.zeros_like(v0), v0, zeros, zeros,
                                                            jnp.zeros((), dtype)))
    return Tridiagonal(alphas, betas, None)


__all__ = ["Tridiagonal", "lanczos"]
