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

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import tree_mismatch

PyTree = Any


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(updates, state, params=None) -> (updates, state)``.

    A transformation that reads more of the pass than the gradient (K-FAC's Kronecker factors)
    names the engine's extensions it needs in ``extensions``; the training steps
    (``fbp.train.make_step``, ``fit``) then run ``fbp.value_and_grad(..., extensions=...)`` and
    call ``update(grads, state, params, extras=q)`` with the extensions' results ``q`` —
    on the steps where ``due(state)`` (``None``: every step) is true; on the others ``q`` holds
    zeros and ``update`` must not read it (it knows from its state).
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    extensions: tuple = ()
    due: Callable[[PyTree], Any] | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def identity() -> GradientTransformation:
    """Pass the updates through unchanged."""
    return transformation("identity", lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def chain(*transformations: GradientTransformation) -> GradientTransformation:
    """Apply transformations in order.

    E.g. ``chain(clip_by_global_norm(1.0), scale_by_adam(), scale(-lr))``.

    Args:
        *transformations: the transformations (``GradientTransformation``), first applied first.

    Returns:
        One ``GradientTransformation`` whose state is the tuple of their states.

    Raises:
        TypeError: an argument is not a ``GradientTransformation``.
    """
    for i, t in enumerate(transformations):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} must be a GradientTransformation (e.g. fbp.optim.scale_by_adam()), "
                            f"got {type(t).__name__}")

    def init(params):
        return tuple(t.init(params) for t in transformations)

    reading = [i for i, t in enumerate(transformations) if t.extensions]
    extensions = tuple(dict.fromkeys(e for i in reading for e in transformations[i].extensions))

    def due(state):
        flags = [transformations[i].due(state[i]) if transformations[i].due else True for i in reading]
        return functools.reduce(jnp.logical_or, flags, jnp.zeros((), bool))

    def update(updates, state, params=None, *, extras=None):
        if not isinstance(state, tuple) or len(state) != len(transformations):
            got = f"a tuple of {len(state)}" if isinstance(state, tuple) else f"a {type(state).__name__}"
            raise ValueError(f"chain of {len(transformations)} transformations: the optimizer state must be a tuple "
                             f"of {len(transformations)} states, received {got} — a state from another optimizer? "
                             f"Make it with opt.init(params)")
        new_state = []
        for t, s in zip(transformations, state, strict=True):
            updates, s = t.update(updates, s, params, extras=extras) if t.extensions else t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update, extensions, due if reading else None)


def _mismatch(reference: PyTree, other: PyTree) -> str | None:
    problem = tree_mismatch(reference, other)
    return None if problem is None else problem[1]


def transformation(name: str, init: Callable[[PyTree], PyTree], update: Callable[..., tuple[PyTree, PyTree]]
                   ) -> GradientTransformation:
    """A ``GradientTransformation`` whose ``update`` first checks that ``state`` is what
    ``init`` makes for parameters shaped like the updates (and that ``params``, when given, has
    their structure). The check compares structures and shapes only: under ``jit`` it runs once,
    at trace time, and names the transformation and the first path that differs.

    Args:
        name: how errors name it.
        init: ``params -> state``.
        update: ``(updates, state, params=None) -> (updates, state)``.

    Returns:
        A ``GradientTransformation`` with the checked ``update``.
    """

    def checked_update(updates, state, params=None):
        expected = jax.eval_shape(init, updates)
        problem = _mismatch(expected, state)
        if problem is not None:
            raise ValueError(f"{name}: the optimizer state does not match the gradients ({problem}). Was it made "
                             f"by another optimizer, or from another params tree? Make it with opt.init(params)")
        if params is not None:
            problem = _mismatch(params, updates)
            if problem is not None:
                raise ValueError(f"{name}: the gradients do not match the params ({problem})")
        return update(updates, state, params)

    return GradientTransformation(init, checked_update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf, keeping each parameter's dtype.

    ``updates`` must have the structure and leaf shapes of ``params`` (no broadcasting: an update
    that would change a parameter's shape raises ``ValueError``).

    Args:
        params: the parameters.
        updates: what the optimizer returned, shaped like ``params``.

    Returns:
        The new parameters.
    """
    problem = _mismatch(params, updates)
    if problem is not None:
        raise ValueError(f"apply_updates: the updates do not match the params ({problem}); a parameter must keep "
                         f"its shape")
    return jax.tree_util.tree_map(lambda p, u: (p + u).astype(jnp.asarray(p).dtype), params, updates)


def global_norm(tree: PyTree) -> jax.Array:
    """``sqrt(Σ_leaves Σ x²)``, the Euclidean norm of all leaves together.

    Computed overflow-safely as ``m · sqrt(Σ (x / m)²)`` with ``m`` the largest magnitude, so
    finite leaves whose squares overflow (3e19 in float32) still give a finite norm when it
    is representable; a NaN or inf entry gives a non-finite norm.

    Args:
        tree: a pytree of arrays.

    Returns:
        A scalar array.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros(())
    largest, scaled = scaled_sum_of_squares(leaves)
    return largest * jnp.sqrt(scaled)


def scaled_sum_of_squares(leaves):
    """The squared norm of several arrays, scaled by their largest entry so squares cannot overflow.

    Args:
        leaves: the arrays.

    Returns:
        ``(m, Σ (x / m)²)`` with ``m = max |x|``: the norm is ``m · sqrt(Σ)`` (the scale is 1
        when every entry is 0, and ``m`` then 0).
    """
    largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
                                             for x in leaves])
    m = jnp.where(largest > 0, largest, jnp.ones_like(largest))
    return largest, sum(jnp.sum(jnp.square(x / m.astype(x.dtype))) for x in leaves)


def increment(count: jax.Array) -> jax.Array:
    """A step counter's next value, saturating at the int32 maximum instead of wrapping (as optax does).

    Args:
        count: an int32 counter.

    Returns:
        ``count + 1``, or the maximum.
    """
    limit = jnp.iinfo(jnp.int32).max
    return jnp.where(count < limit, count + 1, limit).astype(jnp.int32)


def zeros_like(params: PyTree) -> PyTree:
    """Zeros shaped like ``params`` (the first moments, traces and accumulators start here).

    Args:
        params: a pytree of arrays.

    Returns:
        A pytree of zeros with the same structure, shapes and dtypes.
    """
    return jax.tree_util.tree_map(jnp.zeros_like, params)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (for hyperparameter validation).

    Args:
        condition: what must hold.
        message: the error message.

    Raises:
        ValueError: ``condition`` is false.
    """
    if not condition:
        raise ValueError(message)
