"""Gradient transformations: optax's shape, written here (no optax).

A transformation is a pair of pure functions::

    state            = tx.init(params)
    updates, state   = tx.update(grads, state, params=None)
    params           = apply_updates(params, updates)

``chain(t1, t2, ...)`` feeds the updates of each transformation into the next; its state is
the tuple of their states. States are NamedTuples, so they are pytrees: they jit, scan and
checkpoint like params.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(updates, state, params=None) -> (updates, state)``."""

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def identity() -> GradientTransformation:
    """Pass the updates through unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def chain(*transformations: GradientTransformation) -> GradientTransformation:
    """Apply ``transformations`` in order; e.g. ``chain(clip_by_global_norm(1.0), scale_by_adam(), scale(-lr))``."""

    def init(params):
        return tuple(t.init(params) for t in transformations)

    def update(updates, state, params=None):
        new_state = []
        for t, s in zip(transformations, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf, keeping each parameter's dtype."""
    return jax.tree_util.tree_map(lambda p, u: (p + u).astype(jnp.asarray(p).dtype), params, updates)


def global_norm(tree: PyTree) -> jax.Array:
    """``sqrt(Σ_leaves Σ x²)``, the Euclidean norm of all leaves together."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros(())
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum instead of wrapping (as optax does)."""
    limit = jnp.iinfo(jnp.int32).max
    return jnp.where(count < limit, count + 1, limit).astype(jnp.int32)


def zeros_like(params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, params)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (for hyperparameter validation)."""
    if not condition:
        raise ValueError(message)
