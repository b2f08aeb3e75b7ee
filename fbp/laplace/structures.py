r"""The Hessian structures of a Laplace posterior, all in the flat coordinates of a
``fbp.subspace.Subspace``: the likelihood's curvature ``H`` (without its scale ``s``) and, for a
prior precision ``δ`` (one per layer: ``delta``, a vector over the coordinates), the posterior
precision ``P = s H + diag(δ)`` through three operations:

* ``logdet(s, delta)`` — ``log det P`` (closed form from eigenvalues, differentiable in ``s, δ``);
* ``solve(v, s, delta)`` — ``P⁻¹ v``;
* ``sample(key, s, delta)`` — ``P^{-1/2} ε`` with ``ε ~ N(0, I)``: a draw from ``N(0, P⁻¹)``.

**Diagonal**: ``H = diag(diag G)``, the exact GGN diagonal (``fbp.curvature.diag_ggn``).

**Kronecker** (``"kfac"``): every Dense-like weight's block ``A ⊗ G`` (``fbp.curvature.kfac_factors``) with
``A`` averaged and ``G`` summed over the data, so that ``A ⊗ G ≈ Σ_n vec(∇ℓ_n)vec(∇ℓ_n)ᵀ``;
every other parameter its exact diagonal. With ``A = Q_A Λ_A Q_Aᵀ`` and ``G = Q_G Λ_G Q_Gᵀ`` the
damped block has the eigenvalues ``s λ_{A,i} λ_{G,j} + δ`` in the basis ``Q_A ⊗ Q_G``, so
``log det``, the solve and the square root are exact for the Kronecker-factored ``P``
(Ritter, Botev & Barber, 2018; Immer et al., 2021), never the factored-damping approximation.

**Eigenvalue-corrected Kronecker** (``"ekfac"``; George et al., 2018): K-FAC's eigenbases
``Q_A ⊗ Q_G`` with the eigenvalues refitted to the data, ``Λ_ij = Σ_{n,m} (Q_Aᵀ R_nm Q_G)_ij²``
(``R_nm`` the per-example gradient matrix of the loss's factor column ``m``): the best diagonal
in that basis (in Frobenius norm), always at least as close to the GGN as K-FAC.

**Dense**: ``H = Σ_{n,m} r_nm r_nmᵀ`` with ``r_nm = J_nᵀ s_nm`` the per-example gradients of the
loss's Hessian-factor columns (``fbp.per_example.backward_columns``, mode ``"grads"``): the
exact GGN of the chosen coordinates, ``dim × dim`` — the last layer, or a small model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (loaded on import)
import numpy as np

from fbp.curvature import block_entries, block_matrix
from fbp.nn.positions import assemble
from fbp.walk import map_leaf_params

STRUCTURES = ("diag", "kfac", "ekfac", "full", "last_layer")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Diagonal:
    """``H = diag(d)``.

    Attributes:
        d: ``(dim,)``, the GGN diagonal.
    """

    d: jax.Array

    def logdet(self, s, delta):
        return jnp.sum(jnp.log(s * self.d + delta))

    def solve(self, v, s, delta):
        return v / (s * self.d + delta)

    def sample(self, key, s, delta):
        return jax.random.normal(key, self.d.shape, self.d.dtype) / jnp.sqrt(s * self.d + delta)

    def mean_eigenvalue(self):
        return jnp.mean(self.d)

    def variance_weights(self, s, delta):
        """``(1/(s d + δ), {})``: ``P⁻¹``'s diagonal and no blocks (``fbp.laplace.variances``)."""
        return 1 / (s * self.d + delta), {}

    def spectral(self, v):
        """``v`` in an eigenbasis of ``H`` (here the identity); ``eigenvalues()`` in the same layout."""
        return v

    def eigenvalues(self):
        return self.d

    def diagonal_in_eigenbasis(self, delta) -> bool:
        return True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dense:
    """``H`` as a ``(dim, dim)`` matrix, by its eigendecomposition ``H = U diag(λ) Uᵀ``.

    Attributes:
        values: ``λ``, ``(dim,)``.
        vectors: ``U``, ``(dim, dim)``.
    """

    values: jax.Array
    vectors: jax.Array

    @classmethod
    def of(cls, h):
        """From a GGN ``h`` (symmetrised; rounding's tiny negative eigenvalues set to 0)."""
        values, vectors = jnp.linalg.eigh((h + h.T) / 2)
        return cls(jnp.maximum(values, 0), vectors)

    def mean_eigenvalue(self):
        return jnp.mean(self.values)

    def spectral(self, v):
        return self.vectors.T @ v

    def eigenvalues(self):
        return self.values

    def diagonal_in_eigenbasis(self, delta) -> bool:
        return jnp.ndim(delta) == 0  # one δ per layer is not diagonal in H's eigenbasis

    def logdet(self, s, delta):
        if jnp.ndim(delta) == 0:
            return jnp.sum(jnp.log(s * self.values + delta))
        precision = (self.vectors * (s * self.values)) @ self.vectors.T + jnp.diag(delta)
        return 2 * jnp.sum(jnp.log(jnp.diag(jnp.linalg.cholesky(precision))))

    def solve(self, v, s, delta):
        if jnp.ndim(delta) == 0:
            return self.vectors @ ((self.vectors.T @ v) / (s * self.values + delta))
        precision = (self.vectors * (s * self.values)) @ self.vectors.T + jnp.diag(delta)
        return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(precision), True), v)

    def sample(self, key, s, delta):
        eps = jax.random.normal(key, self.values.shape, self.values.dtype)
        if jnp.ndim(delta) == 0:
            return self.vectors @ (eps / jnp.sqrt(s * self.values + delta))
        precision = (self.vectors * (s * self.values)) @ self.vectors.T + jnp.diag(delta)
        # P = L Lᵀ: x = L⁻ᵀ ε has covariance P⁻¹
        return jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(precision), eps, lower=True, trans="T")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["eigen", "diagonal", "covered"],
                   meta_fields=["layout", "space", "model"])
@dataclasses.dataclass(frozen=True)
class Kronecker:
    """Kronecker-factored curvature (``"kfac"``, ``"ekfac"``; module docstring).

    Attributes:
        eigen: per leaf layer its blocks' eigenbases and eigenvalues, ``[(Q_A, Q_G, Λ), ...]``
            (``Λ_ij = λ_{A,i} λ_{G,j}`` for K-FAC; refitted for EK-FAC: ``with_eigenvalues``).
        diagonal: the exact GGN diagonal of the coordinates no block covers (0 at covered ones).
        covered: 1 at the coordinates a block covers.
        layout: ``((path, blocks), ...)``: per leaf layer its ``KroneckerBlock`` s with shapes in
            place of ``A`` and ``G`` (how flat coordinates map to block matrices; static).
        space: the ``Subspace``.
        model: the model.
    """

    eigen: dict
    diagonal: jax.Array
    covered: jax.Array
    layout: tuple
    space: Any
    model: Any

    @property
    def blocks(self) -> dict:
        return dict(self.layout)

    @classmethod
    def of(cls, factors: dict, model, params, space, separate_bias: bool = False):
        """From ``{path: fbp.curvature.Factors}`` (data totals) and the ``Subspace``.

        ``separate_bias``: split each block ``[W; b]`` into ``A_W ⊗ G`` and a bias block
        ``1 ⊗ G``, dropping the weight-bias cross terms (laplace-torch's and BackPACK's convention;
        fbp keeps them by default)."""
        if separate_bias:
            factors = {path: f._replace(blocks=[part for b in f.blocks for part in _split_bias(b)])
                       for path, f in factors.items()}
        eigen, blocks = {}, {}
        covered_tree = map_leaf_params(model, params, lambda path, layer, p: jax.tree_util.tree_map(
            lambda a: np.zeros(np.shape(a)), p))
        for path, f in factors.items():
            eigen[path], blocks[path] = [], tuple(f.blocks)
            for b in f.blocks:
                la, qa = jnp.linalg.eigh(b.A)
                lg, qg = jnp.linalg.eigh(b.G)
                eigen[path].append((qa, qg, jnp.maximum(la, 0)[:, None] * jnp.maximum(lg, 0)[None, :]))
        diag_tree = map_leaf_params(model, params, lambda path, layer, p: factors[path].diagonal
                                    if path in factors else jax.tree_util.tree_map(jnp.zeros_like, p))

        def mark(path, layer, p):
            out = p
            for b in blocks.get(path, ()):
                ones = {key: np.ones(shape) for key, shape in b.kernels}
                if b.bias is not None:
                    ones[b.bias] = np.ones((b.G.shape[0],))
                out = assemble(out, ones)
            return out

        covered_tree = map_leaf_params(model, covered_tree, mark)
        covered = space.restrict(jax.tree_util.tree_map(jnp.asarray, covered_tree))
        keep = {path: e for path, e in eigen.items() if path in space.groups}
        shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
        layout = tuple((p, tuple(dataclasses.replace(b, A=shape(b.A), G=shape(b.G)) for b in blocks[p]))
                       for p in keep)
        return cls(keep, space.restrict(diag_tree) * (1 - covered), covered, layout, space, model)

    def with_eigenvalues(self, lam: dict) -> Kronecker:
        """The same eigenbases with the eigenvalues ``lam[path] = [Λ, ...]`` (EK-FAC's refit)."""
        eigen = {path: [(qa, qg, new) for (qa, qg, _), new in zip(e, lam[path], strict=True)]
                 for path, e in self.eigen.items()}
        return dataclasses.replace(self, eigen=eigen)

    def rotate(self, tree) -> dict:
        """``{path: [Q_Aᵀ W Q_G, ...]}``: a params-shaped tree's block matrices in the eigenbases."""
        out = {}
        for path, eig in self.eigen.items():
            src = _leaf(tree, self.model, path)
            out[path] = [qa.T @ block_matrix(src, block) @ qg
                         for block, (qa, qg, _) in zip(self.blocks[path], eig, strict=True)]
        return out

    def variance_weights(self, s, delta):
        """``P⁻¹`` in the eigenbases, for ``fbp.laplace.variances``: ``1/(s d + δ)`` at the
        coordinates no block covers (0 at the others), and ``{path: [(block, Q_A, Q_G, 1/(s Λ + δ)), ...]}``."""
        diag = jnp.where(self.covered > 0, 0, 1 / (s * self.diagonal + delta))
        blocks = {path: [(block, qa, qg, 1 / (s * lam + self._delta_of(delta, path)))
                         for block, (qa, qg, lam) in zip(self.blocks[path], eig, strict=True)]
                  for path, eig in self.eigen.items()}
        return diag, blocks

    def mean_eigenvalue(self):
        total = jnp.sum(self.diagonal)
        for eig in self.eigen.values():
            total = total + sum(jnp.sum(lam) for _, _, lam in eig)
        return total / self.covered.size

    def _delta_of(self, delta, path):
        if jnp.ndim(delta) == 0:
            return delta
        start, _ = self.space.groups[path]
        return delta[start]  # one prior precision per layer: every coordinate of the layer has it

    def logdet(self, s, delta):
        total = jnp.sum(jnp.where(self.covered > 0, 0, jnp.log(s * self.diagonal + delta)))
        for path, eig in self.eigen.items():
            d = self._delta_of(delta, path)
            for _, _, lam in eig:
                total = total + jnp.sum(jnp.log(s * lam + d))
        return total

    def _apply(self, v, s, delta, scale):
        """``P^{-1}`` (scale=1) or ``P^{-1/2}`` (scale=½) on each block and the diagonal."""
        out_flat = jnp.where(self.covered > 0, 0, v * (s * self.diagonal + delta) ** -scale)
        tree = self.space.embed(v)
        out_tree = self.space.embed(out_flat)

        def leaf(path, layer, g):
            if path not in self.eigen:
                return g
            d = self._delta_of(delta, path)
            src = _leaf(tree, self.model, path)
            for block, (qa, qg, lam) in zip(self.blocks[path], self.eigen[path], strict=True):
                w = block_matrix(src, block)
                mid = (qa.T @ w @ qg) * (s * lam + d) ** -scale
                g = assemble(g, block_entries(qa @ mid @ qg.T, block, src))
            return g

        return self.space.restrict(map_leaf_params(self.model, out_tree, leaf))

    def solve(self, v, s, delta):
        return self._apply(v, s, delta, 1.0)

    def sample(self, key, s, delta):
        return self._apply(jax.random.normal(key, self.covered.shape, self.covered.dtype), s, delta, 0.5)

    def _blockwise(self, v, inner):
        """``v`` with every block's matrix ``W`` replaced by ``inner(W, Q_A, Q_G, Λ)`` in place."""
        tree = self.space.embed(v)

        def leaf(path, layer, g):
            for block, (qa, qg, lam) in zip(self.blocks.get(path, ()), self.eigen.get(path, ()), strict=True):
                g = assemble(g, block_entries(inner(block_matrix(g, block), qa, qg, lam), block, g))
            return g

        return self.space.restrict(map_leaf_params(self.model, tree, leaf))

    def spectral(self, v):
        """``v`` in the eigenbasis: each block's ``Q_Aᵀ W Q_G`` in the block's place, the rest unchanged."""
        return self._blockwise(v, lambda w, qa, qg, lam: qa.T @ w @ qg)

    def eigenvalues(self):
        """The eigenvalues in ``spectral``'s layout: ``Λ`` in each block's place, the diagonal elsewhere."""
        return self._blockwise(self.diagonal, lambda w, qa, qg, lam: lam)

    def diagonal_in_eigenbasis(self, delta) -> bool:
        return True  # δ is one per layer, and every block lies in one layer


def _split_bias(block):
    if block.bias is None or not block.kernels:
        return [block]
    return [dataclasses.replace(block, bias=None, A=block.A[:-1, :-1]),
            dataclasses.replace(block, kernels=(), A=block.A[-1:, -1:])]


def _leaf(tree, model, path):
    found = {}
    map_leaf_params(model, tree, lambda p, layer, t: found.setdefault(p, t) if p == path else t)
    return found[path]


__all__ = ["STRUCTURES", "Dense", "Diagonal", "Kronecker"]
