"""Curvature diagnostics of the reduced loss's generalised Gauss-Newton matrix ``G = Jᵀ H J``.

* **Trace**: exact as the sum of the GGN diagonal (the loss's Hessian-factor columns
  backpropagated on the pass's residuals, ``fbp.curvature.DiagGGN``; its cost grows with the
  number of classes: one backward per class), or the sum of the **Monte-Carlo** diagonal (one
  sampled column per example, ``DiagGGNMC(1)``: one more backward, unbiased), or
  **Hutchinson**'s estimate ``tr G ≈ (1/M) Σ_m v_mᵀ G v_m`` with Rademacher ``v_m``
  (Hutchinson, 1989), where ``vᵀ G v = ‖Sᵀ J v‖²`` needs one Jacobian-vector product per
  sample (``S`` the loss's Hessian factor, ``H = S Sᵀ``). Its standard error is
  ``sqrt(2 ‖G‖_F² / M)`` at most.
* **Largest eigenvalue** by **Lanczos** (Lanczos, 1950) on GGN-vector products (``J v`` by
  transposing the pass's linear backward, ``H``, then the backward), with full
  reorthogonalisation: ``k`` products give the top Ritz value of a Krylov space of dimension
  ``k``, which converges to ``λ_max`` from below, geometrically in the gap to ``λ_2``.
* **TIC** with diagonal curvature (Thomas et al., 2020, as Cockpit's TICDiag): ``Σ_i C_ii / (G_ii + ε)``
  with ``C = (1/B) Σ_b g_b g_bᵀ`` the uncentred second moment of the per-example gradients
  (``SGS/B``) and ``G_ii`` the exact GGN diagonal (or the Monte-Carlo one, as Cockpit's
  ``curvature="diag_ggn_mc"``).

All are of the reduced loss (the mean, for ``reduction="mean"``), as ``fbp.curvature``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fbp.curvature import DiagGGN, DiagGGNMC, ggn_product_of_pass
from fbp.extensions import Extension
from fbp.lanczos import _dot, lanczos
from fbp.linear_pass import jacobian_vector_product


def _hessian_sqrt_jvp(context, v):
    """``Sᵀ J v`` per example: ``(B, M)``; ``‖·‖²`` summed is ``vᵀ G v``."""
    jv = jacobian_vector_product(context.back, context.pred, v)
    s = context.loss.hessian_factor(context.pred, context.y)
    return jnp.einsum("n...m,n...->nm", s, jv)


def ggn_product(context, v):
    """``G v`` shaped like the params (the pass's ``J``, the loss's ``H``, the pass's ``Jᵀ``):
    ``fbp.curvature``'s product on this pass.

    Args:
        context: the pass (``fbp.extensions.Context``: its ``back``, ``pred``, ``loss``, ``y``).
        v: the direction, shaped like the params.

    Returns:
        ``G v``, shaped like the params.
    """
    return ggn_product_of_pass(context.back, context.pred, context.loss, context.y, v)


def _diagonal(mc: bool):
    return DiagGGNMC(1) if mc else DiagGGN()


def _leaf_sum(tree) -> jax.Array:
    return sum((jnp.sum(a) for a in jax.tree_util.tree_leaves(tree)), jnp.zeros(()))


@dataclasses.dataclass(frozen=True, eq=False)
class GGNTrace(Extension):
    """``{"total", "layers": {path: trace}}`` of the GGN (exact) or ``{"total", "stderr"}``
    (Hutchinson; module docstring).

    Args:
        method: ``"exact"`` (the diagonal's sum), ``"mc"`` (the Monte-Carlo diagonal's sum, one
            sample per example; the call needs a key) or ``"hutchinson"``.
        vectors: Hutchinson's ``M``, the random vectors.
        key: Hutchinson's random key (build the extension inside the jitted step when it changes).
    """

    method: str = "exact"
    vectors: int = 8
    key: Any = None
    name: ClassVar[str] = "ggn_trace"
    requires_independence: ClassVar[bool] = False

    def __post_init__(self):
        if self.method not in ("exact", "mc", "hutchinson"):
            raise ValueError(f"GGNTrace: method must be 'exact', 'mc' or 'hutchinson', got {self.method!r}")
        if self.method == "hutchinson" and (self.key is None or int(self.vectors) < 1):
            raise ValueError("GGNTrace(method='hutchinson') needs key=jax.random.key(...) and vectors >= 1")

    @property
    def needs(self):  # the diagonal's columns; Hutchinson reads only the pass
        return "norms" if self.method == "hutchinson" else "columns"

    @property
    def samples(self):  # the Monte-Carlo columns are drawn (the call needs a key)
        return self.method == "mc"

    @property
    def column_key(self):  # one column pass with DiagGGN (DiagGGNMC(1)) and TICDiag of the same kind
        return _diagonal(self.method == "mc").column_key

    def columns(self, loss, y, key):
        return _diagonal(self.method == "mc").columns(loss, y, key)

    def finalize(self, found, context):
        if self.method != "hutchinson":
            layers = {path: _leaf_sum(d) for path, d in found.items()}
            return {"total": sum(layers.values(), jnp.zeros(())), "layers": layers}
        flat, unravel = ravel_pytree(context.grads)
        signs = jax.random.rademacher(self.key, (self.vectors, flat.size), flat.dtype)
        quad = jax.vmap(lambda v: jnp.sum(jnp.square(_hessian_sqrt_jvp(context, unravel(v)))))(signs)
        return {"total": jnp.mean(quad), "stderr": jnp.std(quad, ddof=1) / jnp.sqrt(self.vectors)
                if self.vectors > 1 else jnp.zeros(())}


def lanczos_top(matvec, dim: int, iterations: int, key, dtype, start=None, with_vector: bool = False, *, like=None):
    """The largest Ritz value of ``matvec`` (symmetric) after ``iterations`` Lanczos steps with
    full reorthogonalisation (``fbp.lanczos``), started from a random unit vector (or ``start``).

    Args:
        matvec: ``v -> A v`` on flat vectors of length ``dim`` (or on pytrees like ``like``).
        dim: the dimension.
        iterations: ``k`` (at most ``dim``).
        key: the start vector's key.
        dtype: the vectors' dtype.
        start: a start vector (a warm start: the last top Ritz vector converges in a few steps
            when the matrix changed little), or ``None``; a zero one falls back to random.
        with_vector: also return the top Ritz vector (unit length).
        like: ``None`` (flat vectors) or the vectors' pytree (``fbp.lanczos.lanczos``).

    Returns:
        The top eigenvalue of the ``k×k`` tridiagonal matrix (and the Ritz vector).
    """
    t = lanczos(matvec, dim, iterations, key, dtype, start, like=like)
    values, vectors, _ = t.ritz()
    if not with_vector:
        return values[-1]
    ritz = t.combine(vectors[:, -1])
    norm = jnp.sqrt(_dot(ritz, ritz, dtype))
    return values[-1], jax.tree_util.tree_map(lambda a: a / jnp.maximum(norm, jnp.finfo(dtype).tiny), ritz)


@dataclasses.dataclass(frozen=True, eq=False)
class GGNMaxEigenvalue(Extension):
    """The GGN's largest eigenvalue by Lanczos on GGN-vector products (module docstring).

    Args:
        iterations: Lanczos steps (GGN-vector products).
        key: the start vector's key.
        start: a warm start, shaped like the params (``fit`` passes the last step's Ritz vector),
            or ``None``.
        with_vector: return ``{"value", "vector"}`` (the Ritz vector shaped like the params).
    """

    iterations: int = 20
    key: Any = None
    start: Any = None
    with_vector: bool = False
    name: ClassVar[str] = "ggn_max_eigenvalue"
    needs: ClassVar[str] = "norms"
    requires_independence: ClassVar[bool] = False

    def finalize(self, found, context):
        key = jax.random.key(0) if self.key is None else self.key
        leaves = jax.tree_util.tree_leaves(context.grads)
        dtype = jnp.result_type(*leaves)
        size = sum(a.size for a in leaves)
        if all(a.dtype == dtype for a in leaves):  # on the params-shaped trees: no flat copies
            out = lanczos_top(lambda v: ggn_product(context, v), size, self.iterations, key, dtype, self.start,
                              self.with_vector, like=context.grads)
            return {"value": out[0], "vector": out[1]} if self.with_vector else out
        flat, unravel = ravel_pytree(context.grads)
        start = None if self.start is None else ravel_pytree(self.start)[0]
        out = lanczos_top(lambda v: ravel_pytree(ggn_product(context, unravel(v)))[0], flat.size, self.iterations,
                          key, flat.dtype, start, self.with_vector)
        return {"value": out[0], "vector": unravel(out[1])} if self.with_vector else out


@dataclasses.dataclass(frozen=True)
class TICDiag(Extension):
    """The Takeuchi information criterion with the GGN diagonal, ``Σ_i (SGS_i/B) / (G_ii + ε)``
    (module docstring; Cockpit's TICDiag with ``curvature="diag_ggn_exact"``).

    Args:
        epsilon: ``ε``.
        curvature: ``"exact"`` (the GGN diagonal) or ``"mc"`` (the Monte-Carlo one, one sample).
    """

    epsilon: float = 1e-7
    curvature: str = "exact"
    name: ClassVar[str] = "tic_diag"
    needs: ClassVar[tuple] = ("sgs", "columns")

    def __post_init__(self):
        if self.curvature not in ("exact", "mc"):
            raise ValueError(f"TICDiag: curvature must be 'exact' or 'mc', got {self.curvature!r}")

    @property
    def samples(self):
        return self.curvature == "mc"

    @property
    def column_key(self):
        return _diagonal(self.curvature == "mc").column_key

    def columns(self, loss, y, key):
        return _diagonal(self.curvature == "mc").columns(loss, y, key)

    def finalize(self, found, context):
        b = context.batch
        total = jnp.zeros(())
        for path, sgs in found["sgs"].items():
            for s, d in zip(jax.tree_util.tree_leaves(sgs), jax.tree_util.tree_leaves(found["columns"][path]),
                            strict=True):
                total = total + jnp.sum((s / b) / (d + self.epsilon))
        return total
