"""The building blocks optimizers are chained from; each docstring carries its update equation.

Notation: ``g`` the incoming update (the gradient at the start of a chain), ``t`` the step
count after increment (1 at the first update), ``θ`` the parameters. All operations are
leafwise over the pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import require_number
from fbp.optim.base import (
    EmptyState,
    GradientTransformation,
    increment,
    transformation,
    zeros_like,
)
from fbp.validation import typed_arguments

PyTree = Any
ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]
tree_map = jax.tree_util.tree_map


def _nonneg(name: str, value: float, owner: str) -> None:
    require_number(owner, name, value, low=0.0)


def _unit(name: str, value: float, owner: str, closed: bool) -> None:
    require_number(owner, name, value, low=0.0, high=1.0, high_open=not closed)


SCHEDULE_PROBES = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


def check_rate(owner: str, name: str, value: ScalarOrSchedule) -> None:
    """Check a learning rate: a finite number ≥ 0, or a schedule that stays finite and ≥ 0.

    A schedule is evaluated at the steps in ``SCHEDULE_PROBES`` (0 to a million); a negative rate
    would be silent gradient ascent. Between and beyond those steps a schedule is not checked: its
    value is recorded in the optimizer state, and a non-finite one shows as non-finite parameters,
    which ``fbp.train.fit`` reports.

    Args:
        owner: the optimizer's name, for messages.
        name: the argument's name.
        value: a number or a schedule ``step -> rate``.

    Raises:
        TypeError: a value that is neither a number nor callable.
        ValueError: a negative or non-finite rate, or a schedule that fails or returns a non-scalar.
    """
    if not callable(value):
        require_number(owner, name, value, low=0.0)
        return
    for step in SCHEDULE_PROBES:
        try:
            out = value(jnp.asarray(step, jnp.int32))
        except Exception as err:  # a schedule that cannot run eagerly on a step count
            raise ValueError(f"{owner}: the {name} schedule failed on step {step}: {err}") from err
        out = np.asarray(out)
        if out.shape != () or not np.issubdtype(out.dtype, np.number):
            raise ValueError(f"{owner}: the {name} schedule must return a scalar, returned {out.shape} {out.dtype} "
                             f"at step {step}")
        if not (np.isfinite(out) and out >= 0):
            raise ValueError(f"{owner}: the {name} schedule gives {float(out)} at step {step}; it must stay finite "
                             f"and >= 0 (a negative rate ascends the loss)")


def _stateless(name: str, fn: Callable[[PyTree, PyTree], PyTree]) -> GradientTransformation:
    return transformation(name, lambda params: EmptyState(), lambda u, state, params=None: (fn(u, params), state))


def _needs_params(params, owner: str) -> None:
    if params is None:
        raise ValueError(f"{owner} needs the parameters: call update(grads, state, params)")


# --------------------------------------------------------------------------- scaling
@typed_arguments
def scale(step_size: float) -> GradientTransformation:
    """``u ← step_size · g``.

    Args:
        step_size: the factor, e.g. ``-learning_rate``.

    Returns:
        A ``GradientTransformation``.
    """
    require_number("scale", "step_size", step_size)
    return _stateless("scale", lambda u, params: tree_map(lambda g: step_size * g, u))


class ScaleByLearningRateState(NamedTuple):
    """``count``: updates so far; ``learning_rate``: the rate used at the last update (for logging)."""

    count: jax.Array
    learning_rate: jax.Array


@typed_arguments
def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """``u ← -η_t · g`` (``+η_t g`` with ``flip_sign=False``); ``η_t = learning_rate(t - 1)`` for a schedule.

    A schedule is evaluated at the number of updates made before this one (0 at the first
    update), as in optax.

    Args:
        learning_rate: ``η``: a float or a schedule ``step -> rate``.
        flip_sign: descend (``-η g``, default) or ascend.

    Returns:
        A ``GradientTransformation``.
    """
    check_rate("scale_by_learning_rate", "learning_rate", learning_rate)
    sign = -1.0 if flip_sign else 1.0

    def init(params):
        return ScaleByLearningRateState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = tree_map(lambda g: (sign * lr * g).astype(g.dtype), updates)
        return updates, ScaleByLearningRateState(increment(state.count), jnp.asarray(lr, jnp.float32))

    return transformation("scale_by_learning_rate", init, update)


# --------------------------------------------------------------------------- momentum
class TraceState(NamedTuple):
    trace: PyTree


@typed_arguments
def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum (Polyak, 1964); Nesterov's form as in Sutskever et al. (2013).

    ``m ← decay · m + g``;  ``u ← m`` (heavy ball) or ``u ← g + decay · m`` (Nesterov).

    Args:
        decay: ``μ``, the momentum.
        nesterov: Nesterov's form.

    Returns:
        A ``GradientTransformation``.
    """
    _unit("momentum (decay)", decay, "trace", closed=True)

    def update(updates, state, params=None):
        m = tree_map(lambda g, t: decay * t + g, updates, state.trace)
        out = tree_map(lambda g, t: g + decay * t, updates, m) if nesterov else m
        return out, TraceState(m)

    return transformation("trace", lambda params: TraceState(zeros_like(params)), update)


# --------------------------------------------------------------------------- adaptive scalings
class ScaleByRssState(NamedTuple):
    sum_of_squares: PyTree


@typed_arguments
def scale_by_rss(initial_accumulator_value: float = 0.1, eps: float = 1e-7) -> GradientTransformation:
    """AdaGrad's scaling (Duchi, Hazan & Singer, 2011).

    ``s ← s + g²`` (``s₀ = initial_accumulator_value``);  ``u ← g / sqrt(s + eps)`` where
    ``s > 0``, else 0 — eps inside the square root, as optax.

    Args:
        initial_accumulator_value: ``s₀``.
        eps: added inside the square root.

    Returns:
        A ``GradientTransformation``.
    """
    _nonneg("initial_accumulator_value", initial_accumulator_value, "scale_by_rss")
    _nonneg("eps", eps, "scale_by_rss")

    def update(updates, state, params=None):
        s = tree_map(lambda g, a: a + g * g, updates, state.sum_of_squares)
        out = tree_map(lambda g, a: jnp.where(a > 0, g * jax.lax.rsqrt(a + eps), 0.0).astype(g.dtype), updates, s)
        return out, ScaleByRssState(s)

    init = lambda params: ScaleByRssState(tree_map(lambda p: jnp.full_like(p, initial_accumulator_value), params))
    return transformation("scale_by_rss", init, update)


class ScaleByRmsState(NamedTuple):
    count: jax.Array
    nu: PyTree


def _rms_scale(g, nu, eps, eps_in_sqrt):
    return g * jax.lax.rsqrt(nu + eps) if eps_in_sqrt else g / (jnp.sqrt(nu) + eps)


@typed_arguments
def scale_by_rms(decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, eps_in_sqrt: bool = True,
                 bias_correction: bool = False) -> GradientTransformation:
    """RMSProp's scaling (Tieleman & Hinton, 2012, lecture 6.5).

    ``ν ← decay · ν + (1 - decay) g²`` (``ν₀ = initial_scale``); with ``bias_correction``,
    ``ν̂ = ν / (1 - decayᵗ)``, else ``ν̂ = ν``. ``u ← g / sqrt(ν̂ + eps)`` — optax's default
    puts eps **inside** the square root, unlike the lecture's ``g / (sqrt(ν) + eps)``, which
    ``eps_in_sqrt=False`` gives.

    Args:
        decay: the moving average's decay.
        eps: the stabiliser.
        initial_scale: ``ν₀``.
        eps_in_sqrt: ``eps`` inside the square root (optax's default) or outside.
        bias_correction: divide by ``1 - decayᵗ``.

    Returns:
        A ``GradientTransformation``.
    """
    _unit("decay", decay, "scale_by_rms", closed=True)
    require_number("scale_by_rms", "eps", eps, low=0.0, low_open=True)  # eps = 0 turns a zero gradient into 0/0
    _nonneg("initial_scale", initial_scale, "scale_by_rms")

    def update(updates, state, params=None):
        count = increment(state.count)
        nu = tree_map(lambda g, n: decay * n + (1 - decay) * g * g, updates, state.nu)
        nu_hat = tree_map(lambda n: n / (1 - decay**count), nu) if bias_correction else nu
        return tree_map(lambda g, n: _rms_scale(g, n, eps, eps_in_sqrt), updates, nu_hat), ScaleByRmsState(count, nu)

    init = lambda params: ScaleByRmsState(jnp.zeros((), jnp.int32),
                                          tree_map(lambda p: jnp.full_like(p, initial_scale), params))
    return transformation("scale_by_rms", init, update)


class ScaleByStddevState(NamedTuple):
    count: jax.Array
    mu: PyTree
    nu: PyTree


@typed_arguments
def scale_by_stddev(decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0, eps_in_sqrt: bool = True,
                    bias_correction: bool = False) -> GradientTransformation:
    """Centered RMSProp (Graves, 2013): divide by an estimate of the gradient's standard deviation.

    ``μ ← decay · μ + (1 - decay) g``;  ``ν ← decay · ν + (1 - decay) g²``;
    ``u ← g / sqrt(ν̂ - μ̂² + eps)`` (hats: optional bias correction; eps placement as in
    ``scale_by_rms``).

    Args:
        decay: the moving averages' decay.
        eps: the stabiliser.
        initial_scale: ``ν₀``.
        eps_in_sqrt: ``eps`` inside the square root or outside.
        bias_correction: divide both averages by ``1 - decayᵗ``.

    Returns:
        A ``GradientTransformation``.
    """
    _unit("decay", decay, "scale_by_stddev", closed=True)
    require_number("scale_by_stddev", "eps", eps, low=0.0, low_open=True)
    _nonneg("initial_scale", initial_scale, "scale_by_stddev")

    def update(updates, state, params=None):
        count = increment(state.count)
        mu = tree_map(lambda g, m: decay * m + (1 - decay) * g, updates, state.mu)
        nu = tree_map(lambda g, n: decay * n + (1 - decay) * g * g, updates, state.nu)
        correct = (lambda x: x / (1 - decay**count)) if bias_correction else (lambda x: x)
        out = tree_map(lambda g, m, n: _rms_scale(g, correct(n) - correct(m) ** 2, eps, eps_in_sqrt), updates, mu, nu)
        return out, ScaleByStddevState(count, mu, nu)

    init = lambda params: ScaleByStddevState(jnp.zeros((), jnp.int32), zeros_like(params),
                                             tree_map(lambda p: jnp.full_like(p, initial_scale), params))
    return transformation("scale_by_stddev", init, update)


class ScaleByAdamState(NamedTuple):
    count: jax.Array
    mu: PyTree
    nu: PyTree


@typed_arguments
def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0, *,
                  nesterov: bool = False) -> GradientTransformation:
    """Adam's scaling (Kingma & Ba, 2015); Nesterov variant NAdam (Dozat, 2016) as in optax.

    ``m ← b1 m + (1-b1) g``;  ``v ← b2 v + (1-b2) g²``;  ``m̂ = m / (1 - b1ᵗ)``,
    ``v̂ = v / (1 - b2ᵗ)``;  ``u ← m̂ / (sqrt(v̂ + eps_root) + eps)``.
    Nesterov: ``m̂ = b1 m / (1 - b1^{t+1}) + (1 - b1) g / (1 - b1ᵗ)``.

    Args:
        b1: ``β₁``.
        b2: ``β₂``.
        eps: added to ``sqrt(v̂)``.
        eps_root: added inside the square root.
        nesterov: NAdam's first moment.

    Returns:
        A ``GradientTransformation``.
    """
    _unit("b1", b1, "scale_by_adam", closed=False)
    _unit("b2", b2, "scale_by_adam", closed=False)
    _nonneg("eps", eps, "scale_by_adam")
    _nonneg("eps_root", eps_root, "scale_by_adam")
    if eps == 0 and eps_root == 0:
        raise ValueError("scale_by_adam: eps and eps_root are both 0, so a zero gradient gives 0/0 = NaN; "
                         "keep eps > 0 (default 1e-8)")

    def update(updates, state, params=None):
        count = increment(state.count)
        mu = tree_map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = tree_map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.nu)
        c = count
        if nesterov:
            mu_hat = tree_map(lambda g, m: b1 * m / (1 - b1 ** (c + 1)) + (1 - b1) * g / (1 - b1**c), updates, mu)
        else:
            mu_hat = tree_map(lambda m: m / (1 - b1**c), mu)
        nu_hat = tree_map(lambda v: v / (1 - b2**c), nu)
        out = tree_map(lambda m, v: (m / (jnp.sqrt(v + eps_root) + eps)).astype(m.dtype), mu_hat, nu_hat)
        return out, ScaleByAdamState(count, mu, nu)

    init = lambda params: ScaleByAdamState(jnp.zeros((), jnp.int32), zeros_like(params), zeros_like(params))
    return transformation("scale_by_adam", init, update)


# --------------------------------------------------------------------------- regularisation
def _masked(fn, mask):
    """Apply ``fn(g, θ)`` where ``mask`` (a pytree of bools or a callable on params) is True."""

    def apply(updates, params):
        m = mask(params) if callable(mask) else mask
        if m is None:
            return tree_map(fn, updates, params)
        if jax.tree_util.tree_structure(m) != jax.tree_util.tree_structure(params):
            raise ValueError(f"the mask must be a pytree of bools shaped like the params: "
                             f"{jax.tree_util.tree_structure(params)}, received {jax.tree_util.tree_structure(m)}")
        return tree_map(lambda g, p, keep: fn(g, p) if keep else g, updates, params, m)

    return apply


def _add_term(term: Callable[[jax.Array], jax.Array], mask: Any, owner: str) -> GradientTransformation:
    """``u ← u + term(θ)`` where ``mask`` allows; needs the params."""
    fn = _masked(lambda g, p: g + term(p), mask)

    def update(updates, state, params=None):
        _needs_params(params, owner)
        return fn(updates, params), state

    return transformation(owner, lambda params: EmptyState(), update)


@typed_arguments
def add_decayed_weights(weight_decay: float = 0.0, mask: Any = None) -> GradientTransformation:
    """Decoupled weight decay (Loshchilov & Hutter, 2019): ``u ← u + λ θ``, placed after the
    adaptive scaling; ``mask`` (pytree of bools, or a function of params) limits it, e.g. to kernels.

    Args:
        weight_decay: ``λ``.
        mask: a pytree of bools shaped like the params, or a function of the params returning one; ``None``
            applies it everywhere.

    Returns:
        A ``GradientTransformation``.
    """
    _nonneg("weight_decay", weight_decay, "add_decayed_weights")
    return _add_term(lambda p: weight_decay * p, mask, "add_decayed_weights")


@typed_arguments
def add_l2_penalty(coefficient: float, mask: Any = None) -> GradientTransformation:
    """L2 penalty ``(λ/2) ‖θ‖²`` added to the loss, i.e. ``g ← g + λ θ`` before any scaling.

    Args:
        coefficient: ``λ``.
        mask: a pytree of bools shaped like the params, or a function of the params returning one; ``None``
            applies it everywhere.

    Returns:
        A ``GradientTransformation``.
    """
    _nonneg("coefficient", coefficient, "add_l2_penalty")
    return _add_term(lambda p: coefficient * p, mask, "add_l2_penalty")


@typed_arguments
def add_l1_penalty(coefficient: float, mask: Any = None) -> GradientTransformation:
    """L1 penalty ``λ ‖θ‖₁``: ``g ← g + λ sign(θ)`` (subgradient 0 at θ = 0).

    Args:
        coefficient: ``λ``.
        mask: a pytree of bools shaped like the params, or a function of the params returning one; ``None``
            applies it everywhere.

    Returns:
        A ``GradientTransformation``.
    """
    _nonneg("coefficient", coefficient, "add_l1_penalty")
    return _add_term(lambda p: coefficient * jnp.sign(p), mask, "add_l1_penalty")
