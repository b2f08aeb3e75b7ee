"""Learning-rate schedules: ``schedule(step) -> value``, pure and jittable; names as in optax.

A schedule goes wherever a learning rate goes (``adam(learning_rate=cosine_decay_schedule(...))``);
the value used at the last update is kept in the optimizer state, see
``fbp.optim.learning_rate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp

from fbp.core import require_number
from fbp.optim.base import require
from fbp.validation import typed_arguments

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


@typed_arguments
def constant_schedule(value: float) -> Schedule:
    """``η_t = value``.

    Args:
        value: the rate at every step.

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """
    require_number("constant_schedule", "value", value)
    return lambda step: jnp.full((), value, jnp.float32)


@typed_arguments
def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear from ``init_value`` to ``end_value`` over ``transition_steps`` after ``transition_begin``.

    Args:
        init_value: the rate up to ``transition_begin``.
        end_value: the rate from ``transition_begin + transition_steps`` on.
        transition_steps: steps of the linear change.
        transition_begin: steps before it starts.

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """
    require(transition_steps > 0, f"linear_schedule: transition_steps must be > 0, got {transition_steps}")
    require_number("linear_schedule", "init_value", init_value)
    require_number("linear_schedule", "end_value", end_value)

    def schedule(step):
        t = jnp.clip(step - transition_begin, 0, transition_steps)
        return (init_value - end_value) * (1 - t / transition_steps) + end_value

    return schedule


@typed_arguments
def exponential_decay(init_value: float, transition_steps: int, decay_rate: float, transition_begin: int = 0,
                      staircase: bool = False, end_value: float | None = None) -> Schedule:
    """``η_t = η_0 · r^{(t - t_0)/T}`` (``floor`` of the exponent if ``staircase``), then bounded by ``end_value``.

    Args:
        init_value: ``η_0``.
        transition_steps: ``T``, steps per factor ``r``.
        decay_rate: ``r``.
        transition_begin: ``t_0``, steps at ``η_0`` before the decay.
        staircase: decay in whole steps of ``T``.
        end_value: a floor (``r < 1``) or a ceiling (``r > 1``), or ``None``.

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """
    require(transition_steps > 0, f"exponential_decay: transition_steps must be > 0, got {transition_steps}")
    require_number("exponential_decay", "decay_rate", decay_rate, low=0.0, low_open=True)
    require_number("exponential_decay", "init_value", init_value)
    if end_value is not None:
        require_number("exponential_decay", "end_value", end_value)

    def schedule(step):
        p = jnp.maximum(step - transition_begin, 0) / transition_steps
        value = init_value * decay_rate ** (jnp.floor(p) if staircase else p)
        if end_value is not None:
            value = jnp.maximum(value, end_value) if decay_rate < 1 else jnp.minimum(value, end_value)
        return value

    return schedule


@typed_arguments
def piecewise_constant_schedule(init_value: float, boundaries_and_scales: dict[int, float] | None = None) -> Schedule:
    """``η_t = η_0 · Π_{b ≤ t} scale_b``: at each boundary step the rate is multiplied by its scale.

    Args:
        init_value: ``η_0``.
        boundaries_and_scales: ``{step: scale}``; ``None`` for a constant rate.

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """
    items = sorted((boundaries_and_scales or {}).items())
    require_number("piecewise_constant_schedule", "init_value", init_value)
    for boundary, scale in items:
        require_number("piecewise_constant_schedule", f"the scale at step {boundary}", scale, low=0.0)

    def schedule(step):
        value = jnp.asarray(init_value, jnp.float32)
        for boundary, scale in items:
            value = jnp.where(step >= boundary, value * scale, value)
        return value

    return schedule


@typed_arguments
def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Loshchilov & Hutter (2017): ``η_t = η_0 ((1-α) (½ (1 + cos(π min(t,T)/T)))^p + α)``.

    Args:
        init_value: ``η_0``.
        decay_steps: ``T``, the steps of the decay.
        alpha: ``α``, the final rate as a fraction of ``η_0``.
        exponent: ``p``.

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """
    require(decay_steps > 0, f"cosine_decay_schedule: decay_steps must be > 0, got {decay_steps}")
    for name, value in (("init_value", init_value), ("alpha", alpha), ("exponent", exponent)):
        require_number("cosine_decay_schedule", name, value)

    def schedule(step):
        t = jnp.minimum(step, decay_steps)
        cosine = 0.5 * (1 + jnp.cos(math.pi * t / decay_steps))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]``, each seeing the steps since its start.

    Args:
        schedules: the schedules in order.
        boundaries: the steps where each schedule after the first begins (one fewer than ``schedules``).

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """

    def schedule(step):
        value = schedules[0](step)
        for boundary, nxt in zip(boundaries, schedules[1:], strict=True):
            value = jnp.where(step >= boundary, nxt(step - boundary), value)
        return value

    return schedule


@typed_arguments
def warmup_cosine_decay_schedule(init_value: float, peak_value: float, warmup_steps: int, decay_steps: int,
                                 end_value: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine decay
    to ``end_value`` at ``decay_steps`` (counted from step 0, warm-up included), as optax.

    Args:
        init_value: the rate at step 0.
        peak_value: the rate at the end of the warm-up.
        warmup_steps: steps of the linear warm-up.
        decay_steps: the step at which the decay ends, counted from 0.
        end_value: the final rate.
        exponent: the cosine's exponent ``p``.

    Returns:
        A schedule: ``f(step) -> rate``, jit-friendly (``step`` may be a traced integer).
    """
    require(decay_steps > warmup_steps, "warmup_cosine_decay_schedule: decay_steps must exceed warmup_steps")
    require_number("warmup_cosine_decay_schedule", "peak_value", peak_value, low=0.0, low_open=True)
    require_number("warmup_cosine_decay_schedule", "init_value", init_value)
    require_number("warmup_cosine_decay_schedule", "end_value", end_value)
    warmup = linear_schedule(init_value, peak_value, max(warmup_steps, 1))
    decay = cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha=end_value / peak_value,
                                  exponent=exponent)
    return join_schedules([warmup, decay], [warmup_steps])
