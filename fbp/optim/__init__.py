"""Optimizers as pure gradient transformations, optax's shape, written here (no optax)."""

import jax

from fbp.optim.aliases import adagrad, adam, adamw, rmsprop, sgd
from fbp.optim.base import (
    EmptyState,
    GradientTransformation,
    apply_updates,
    chain,
    global_norm,
    identity,
)
from fbp.optim.clipping import ClipByGlobalNormState, clip, clip_by_global_norm
from fbp.optim.schedules import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    join_schedules,
    linear_schedule,
    piecewise_constant_schedule,
    warmup_cosine_decay_schedule,
)
from fbp.optim.transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByStddevState,
    TraceState,
    add_decayed_weights,
    add_l1_penalty,
    add_l2_penalty,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
    trace,
)

_RAISE = object()


def learning_rate(opt_state, default=_RAISE) -> jax.Array:
    """The learning rate used at the last update, read from an optimizer's state (for logging).

    Args:
        opt_state: the state of an optimizer with a ``scale_by_learning_rate`` step.
        default: returned when the state has none (a bare ``chain`` of other transformations);
            without it, that raises.

    Returns:
        The learning rate (a scalar array), or ``default``.

    Raises:
        ValueError: the state holds no learning rate and no ``default`` is given.
    """
    is_lr_state = lambda s: isinstance(s, ScaleByLearningRateState)
    found = [s.learning_rate for s in jax.tree_util.tree_leaves(opt_state, is_leaf=is_lr_state) if is_lr_state(s)]
    if not found:
        if default is not _RAISE:
            return default
        raise ValueError("this optimizer state holds no scale_by_learning_rate state")
    return found[0]


__all__ = [
    "ClipByGlobalNormState", "EmptyState", "GradientTransformation", "ScaleByAdamState", "ScaleByLearningRateState",
    "ScaleByRmsState", "ScaleByRssState", "ScaleByStddevState", "TraceState", "adagrad", "adam", "adamw",
    "add_decayed_weights", "add_l1_penalty", "add_l2_penalty", "apply_updates", "chain", "clip",
    "clip_by_global_norm", "constant_schedule", "cosine_decay_schedule", "exponential_decay", "global_norm",
    "identity", "join_schedules", "learning_rate", "linear_schedule", "piecewise_constant_schedule", "rmsprop",
    "scale", "scale_by_adam", "scale_by_learning_rate", "scale_by_rms", "scale_by_rss", "scale_by_stddev", "sgd",
    "trace", "warmup_cosine_decay_schedule",
]
