r"""The exact Hessian for influence functions (``fbp.influence.fit(method="hessian")``).

``H = Σ_n ∇²ℓ_n``, the Hessian of the summed training loss in the chosen parameters, dense,
one column per parameter: ``H e_i`` is a Hessian-vector product from the layers' hand-written
second-order rules (``fbp.second_order``: Pearlmutter's R-operator on fbp's own pass, never JAX
autodiff), summed batch by batch. It costs ``dim`` products per batch: small models, or a few
layers (``layers=``).

Unlike the GGN, the Hessian is **indefinite** away from a minimum — and at a trained network's
"minimum" of a non-convex loss its smallest eigenvalues are often slightly negative. Koh &
Liang (2017, §3) damp it, ``(H/N + λI)⁻¹``; that inverse is an influence only when
``H/N + λI`` is positive definite, i.e. ``λ > −λ_min(H)/N``. The negative eigenvalues are kept
(a ``fbp.laplace.structures.Dense`` built from them directly: ``Dense.of`` would clamp them,
as it clamps a GGN's rounding), and ``require_definite`` refuses a damping that leaves
``H/N + λI`` indefinite, naming the smallest one that would do.
The default damping is ``0.1 ×`` the mean *absolute* eigenvalue (the GGN methods' rule on
``|λ|``), raised to ``2 × (−λ_min)`` where that is larger, with a warning that says so.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from fbp.core import Layer, Loss
from fbp.laplace.fitting import _chunks, _slices
from fbp.laplace.structures import Dense
from fbp.second_order import hessian_vector_product

COLUMNS_PER_MAP = 64  # Hessian columns computed at once (memory: that many passes' tangents)


@functools.lru_cache(maxsize=32)
def _batch_function(model: Layer, loss_sum: Loss, space, has_state: bool):
    hvp = hessian_vector_product(model, loss_sum, has_state=has_state)

    def run(params, state, xb, yb):
        def column(e):
            v = space.embed(e)
            return space.restrict(hvp(params, state, xb, yb, v) if has_state else hvp(params, xb, yb, v))

        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        return jax.lax.map(column, jnp.eye(space.dim, dtype=dtype), batch_size=COLUMNS_PER_MAP)

    return jax.jit(run)


def hessian_of(model: Layer, loss: Loss, params, x, y, *, space, state=None, batch_size: int = 256) -> Dense:
    """The Hessian of the summed loss over ``(x, y)`` in ``space``'s coordinates (module docstring).

    Args:
        model: the network (inference mode, as the other curvature methods).
        loss: the loss; its sum over the data is differentiated twice.
        params: the params.
        x: the inputs.
        y: the targets.
        space: the ``fbp.subspace.Subspace``.
        state: the model state, or ``None``.
        batch_size: examples per compiled batch.

    Returns:
        Its eigendecomposition (of the symmetrised matrix), negative eigenvalues kept, as a
        ``fbp.laplace.structures.Dense`` (whose ``solve`` is ``(s H + λI)⁻¹ v``).
    """
    run = _batch_function(model, dataclasses.replace(loss, reduction="sum"), space, state is not None)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    total = sum(run(params, state, _slices(x, lo, hi), _slices(y, lo, hi)) for lo, hi in _chunks(n, batch_size))
    values, vectors = jnp.linalg.eigh((total + total.T) / 2)
    return Dense(values, vectors)


def default_damping(h: Dense, n: int) -> float:
    """``0.1 ×`` the mean ``|λ|`` of ``H/N``, raised to ``2 × (−λ_min/N)`` when that is larger (warned).

    Args:
        h: the Hessian of the summed loss.
        n: the number of training examples.

    Returns:
        ``λ``.
    """
    lam, lowest = 0.1 * float(jnp.mean(jnp.abs(h.values))) / n, float(h.values[0]) / n
    if lam <= -lowest:
        warnings.warn(f"fbp.influence.fit(method='hessian'): the mean loss's Hessian has the eigenvalue {lowest:.3g}; "
                      f"the default damping 0.1 × mean |eigenvalue| = {lam:.3g} would leave H + λI indefinite, so λ = "
                      f"{-2 * lowest:.3g} (twice its size) is used. Pass damping= to choose", UserWarning,
                      stacklevel=4)  # the caller of influence.fit (through typed_arguments)
        lam = -2 * lowest
    return lam


def require_definite(h: Dense, n: int, damping: float) -> None:
    """Refuse a damping that leaves ``H/N + λI`` indefinite (module docstring).

    Args:
        h: the Hessian of the summed loss.
        n: the number of training examples.
        damping: ``λ``.

    Raises:
        ValueError: ``λ ≤ −λ_min(H)/N``.
    """
    lowest = float(h.values[0]) / n
    if damping + lowest <= 0:
        raise ValueError(f"fbp.influence.fit(method='hessian'): the mean training loss's Hessian has the eigenvalue "
                         f"{lowest:.3g}, so H + λI with λ = {damping:.3g} is not positive definite and its inverse is "
                         f"no influence; pass damping > {-lowest:.3g}, or use method='exact' (the GGN, never "
                         f"indefinite)")
