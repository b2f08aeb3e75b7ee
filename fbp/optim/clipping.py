"""Clipping transformations: by value, and by the global norm of the whole update (overflow-safe).

Their equations are in each docstring; they chain like every other block (``fbp.optim.chain``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import require_number
from fbp.optim.base import EmptyState, GradientTransformation, scaled_sum_of_squares, transformation
from fbp.validation import typed_arguments

tree_map = jax.tree_util.tree_map


@typed_arguments
def clip(max_delta: float) -> GradientTransformation:
    """Clip by value: ``u ← clip(g, -max_delta, max_delta)``.

    Args:
        max_delta: the largest magnitude an entry keeps.

    Returns:
        A ``GradientTransformation``.
    """
    require_number("clip", "max_delta", max_delta, low=0.0)
    return transformation("clip", lambda params: EmptyState(),
                          lambda u, state, params=None: (tree_map(lambda g: jnp.clip(g, -max_delta, max_delta), u),
                                                         state))


class ClipByGlobalNormState(NamedTuple):
    """``global_norm``: the norm of the last incoming update, kept so it can be logged; a
    non-finite value means the gradients overflowed (the updates are then non-finite too)."""

    global_norm: jax.Array


@typed_arguments
def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Pascanu, Mikolov & Bengio (2013): ``u ← g · min(1, max_norm / ‖g‖)``, ``‖g‖`` over all leaves.

    Overflow-safe: with ``m = max |g|`` the factor is ``min(1, (max_norm / m) / sqrt(Σ (g/m)²))``,
    so finite gradients whose squares overflow (3e19 in float32) are still clipped to a finite
    update of norm ``max_norm``. All-zero gradients pass through unchanged (no 0/0). A gradient
    holding NaN or inf is not hidden: the updates become NaN and the state's ``global_norm``
    records it.

    Args:
        max_norm: the largest global norm the updates keep.

    Returns:
        A ``GradientTransformation``.
    """
    require_number("clip_by_global_norm", "max_norm", max_norm, low=0.0, low_open=True)

    def update(updates, state, params=None):
        leaves = jax.tree_util.tree_leaves(updates)
        if not leaves:
            return updates, ClipByGlobalNormState(jnp.zeros((), jnp.float32))
        largest, scaled = scaled_sum_of_squares(leaves)
        root = jnp.sqrt(scaled)
        norm = largest * root  # may be inf in the dtype: the factor below never forms it
        shrink = (max_norm / jnp.where(largest > 0, largest, 1.0)) / jnp.where(root > 0, root, 1.0)
        factor = jnp.where(norm <= max_norm, 1.0, shrink)
        factor = jnp.where(jnp.isfinite(largest), factor, jnp.nan)
        new = tree_map(lambda g: (g * factor.astype(g.dtype)).astype(g.dtype), updates)
        return new, ClipByGlobalNormState(norm.astype(jnp.float32))

    return transformation("clip_by_global_norm", lambda params: ClipByGlobalNormState(jnp.zeros((), jnp.float32)),
                          update)
