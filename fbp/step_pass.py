"""The pass a training step runs: plain, under a mixed-precision policy, or with what the
optimizer reads from the pass (``GradientTransformation.extensions``), then its update.

``fbp.steps`` (``make_step``, ``fit``'s indexed step) calls these; they are split from it by
concern: ``steps`` is the loop's book-keeping, this module the one pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp import engine
from fbp import precision as fprecision
from fbp import telemetry as ftelemetry
from fbp.core import InputError, Layer, Loss, describe, path_name, value_grad_and_output
from fbp.optim import GradientTransformation


def gradient_function(model: Layer, loss: Loss, precision=None) -> Callable:
    """One forward, loss and backward pass, in full precision or under a mixed-precision policy.

    Args:
        model: the model.
        loss: the loss.
        precision: ``None``, a ``fbp.precision.Policy`` or its text (``"bfloat16"``); the
            backward is seeded with the loss scale an ``fbp.precision.loss_scaled`` optimizer
            state holds.

    Returns:
        ``f(params, opt_state, x, y, *, state=None, key=None) -> (value, grads, pred, new_state)``.

    Raises:
        TypeError: ``precision`` is neither a policy nor its text.
    """
    if precision is None:
        return lambda params, opt_state, x, y, **context: value_grad_and_output(model, loss, params, x, y, **context)
    policy = parse_policy(precision)

    def f(params, opt_state, x, y, **context):
        _require_params_dtype(policy, params)
        return fprecision.value_grad_and_output(model, loss, policy, params, x, y,
                                                scale=fprecision.current_scale(opt_state), **context)

    return f


def optimizer_update(model: Layer, loss: Loss, optimizer: GradientTransformation, precision=None,
                     caller: str = "fbp.train", telemetry=None) -> Callable:
    """The pass and the optimizer's update, with what the optimizer reads from the pass.

    A plain optimizer gets the gradient of ``gradient_function``'s pass (with ``telemetry``: of
    ``fbp.telemetry.Instrumented``'s, under the same policy and loss scale). One that names engine
    extensions (``GradientTransformation.extensions``: K-FAC's factors) gets them from the same
    pass (``fbp.engine.run``, telemetry's ``Stats`` beside them) as ``update(grads, state, params,
    extras=q)``; on the steps its ``due(state)`` is false the plain backward runs and ``q`` holds
    zeros.

    Args:
        model: the model.
        loss: the loss.
        optimizer: the transformation.
        precision: a mixed-precision policy, or ``None`` (not with extensions).
        caller: for messages.
        telemetry: ``None`` (none), or the statistic names to compute in the same pass (an empty
            tuple or ``True``: all of them).

    Returns:
        ``f(params, opt_state, x, y, *, state=None, key=None) -> (value, updates, opt_state,
        pred, new_state, q)``; ``q["stats"]`` holds the statistics with ``telemetry``.

    Raises:
        ValueError: extensions under a precision policy.
    """
    reads = tuple(getattr(optimizer, "extensions", ()) or ())
    names = None if telemetry is True or telemetry == () else telemetry
    if not reads:
        return _first_order(model, loss, optimizer, precision, telemetry is not None, names)
    if precision is not None:
        raise ValueError(f"{caller}: precision cannot be combined with an optimizer that reads curvature from the "
                         f"pass ({[e.name for e in reads]}): the engine's extensions run in the params' dtype, and "
                         f"K-FAC's eigendecompositions need float32. Train it with precision=None")
    every = reads + ((ftelemetry.Stats(names),) if telemetry is not None else ())
    due = getattr(optimizer, "due", None) if reads else None
    others = tuple(e for e in every if e not in reads)

    def f(params, opt_state, x, y, *, state=None, key=None):
        def full():
            return engine.run(model, loss, every, params, x, y, state=state, key=key)

        if due is None:
            value, grads, pred, new_state, q = full()
        else:
            shapes = jax.eval_shape(full)[4]

            def between():  # the plain pass (and the statistics); zeros for what the optimizer reads
                if others:
                    value, grads, pred, new_state, got = engine.run(model, loss, others, params, x, y, state=state,
                                                                    key=key)
                else:
                    (value, grads, pred, new_state), got = value_grad_and_output(model, loss, params, x, y,
                                                                                 state=state, key=key), {}
                zeros = {name: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), part)
                         for name, part in shapes.items() if name not in got}
                return value, grads, pred, new_state, got | zeros

            value, grads, pred, new_state, q = jax.lax.cond(due(opt_state), full, between)
        updates, opt_state = optimizer.update(grads, opt_state, params, extras=q) if reads else \
            optimizer.update(grads, opt_state, params)
        return value, updates, opt_state, pred, new_state, q

    return f


def _first_order(model, loss, optimizer, precision, telemetry: bool, names):
    """``optimizer_update`` for an optimizer that reads the gradient alone."""
    if not telemetry:
        grads_of = gradient_function(model, loss, precision)

        def plain(params, opt_state, x, y, **context):
            value, grads, pred, new_state = grads_of(params, opt_state, x, y, **context)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return value, updates, opt_state, pred, new_state, {}

        return plain
    probed, policy = ftelemetry.Instrumented.of(model, None, stats=names), parse_policy(precision)

    def instrumented(params, opt_state, x, y, **context):
        if policy is not None:
            _require_params_dtype(policy, params)
        value, grads, pred, new_state, stats = probed.run(loss, params, x, y, policy=policy,
                                                          scale=fprecision.current_scale(opt_state), **context)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return value, updates, opt_state, pred, new_state, {"stats": stats}

    return instrumented


def parse_policy(precision):
    """``precision`` as a ``fbp.precision.Policy`` (``None`` stays ``None``).

    Args:
        precision: ``None``, a policy, or its text (``"bfloat16"``).

    Returns:
        The policy, or ``None``.

    Raises:
        TypeError: anything else.
    """
    if precision is None:
        return None
    policy = fprecision.Policy.parse(precision) if isinstance(precision, str) else precision
    if not isinstance(policy, fprecision.Policy):
        raise TypeError(f"precision must be an fbp.precision.Policy or its text ('bfloat16'), got {precision!r}")
    return policy


def _require_params_dtype(policy, params) -> None:
    """The policy keeps params in ``policy.params``; params in another dtype would be updated in
    that dtype while the policy claims otherwise (its params setting silently ignored)."""
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.issubdtype(jnp.result_type(a), jnp.floating) and jnp.result_type(a) != policy.params:
            raise InputError("precision", f"the policy keeps params in {policy.params.name}, but the parameter "
                                          f"'{path_name(path)}' is {describe(a)}; cast them first with "
                                          f"params = policy.cast(params, policy.params), or choose "
                                          f"Policy(params={jnp.result_type(a).name}, ...)")
