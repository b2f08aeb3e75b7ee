"""Normalisation: BatchNorm, LayerNorm, GroupNorm — each ``y = γ x̂ + β`` with
``x̂ = (x - μ) / sqrt(σ² + ε)`` over some axes, and the full backward through μ and σ².

With ``m`` the number of values each statistic averages, ``g = γ d_y`` and means ``⟨·⟩`` over
those same axes::

    d_x = (g - ⟨g⟩ - x̂ ⟨g x̂⟩) / sqrt(σ² + ε)
    d_γ = Σ d_y x̂          d_β = Σ d_y         (sums over every axis but the channel axis)

(Ioffe & Szegedy, 2015, eq. after Alg. 1, rearranged.) In evaluation mode BatchNorm uses its
running averages, which are constants: ``d_x = γ d_y / sqrt(σ²_run + ε)``. The map ``x ↦ x̂``
has a symmetric Jacobian, so forward mode (``tangent``, ``fbp.linear_pass``) applies the same
formula to ``d_x``: ``d_y = d_γ x̂ + d_β + γ d_x̂``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import InputError, Layer, check_params, describe, require_floating, require_number
from fbp.nn import init as initializers
from fbp.validation import check_fields


def _scale_bias_init(x):
    c = x.shape[-1]
    return {"scale": initializers.ones(None, (c,), x.dtype), "b": initializers.zeros(None, (c,), x.dtype)}


def _check(owner, params, x, min_rank=2):
    require_floating(repr(owner), x)
    if x.ndim < min_rank:
        raise InputError(repr(owner), f"input x must have rank >= {min_rank} (N, ..., C), received {describe(x)}")
    c = x.shape[-1]
    check_params(repr(owner), params, {"scale": (c,), "b": (c,)}, x,
                 hint=lambda name, value: f": one entry per channel of the input's last axis ({c})")


class NormRes(NamedTuple):
    """What a normalisation's backward keeps: the normalised input, ``1/σ`` and the scale ``γ``."""

    x_hat: jax.Array
    inv: jax.Array
    scale: jax.Array


class BatchStats(NamedTuple):
    """A training batch's per-channel statistics, from which ``next_state`` updates the running ones."""

    mean: jax.Array
    var: jax.Array


class BatchNormRes(NamedTuple):
    """BatchNorm's residuals: as ``NormRes``, plus the batch statistics (None in evaluation mode,
    where the running statistics are constants of the backward)."""

    x_hat: jax.Array
    inv: jax.Array
    scale: jax.Array
    stats: BatchStats | None


def _wide(x):
    """16-bit floats widened to float32 (statistics of a mixed-precision layer: ``fbp.precision``)."""
    return x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x


def _normalize(x, axes, epsilon):
    """``(x̂, 1/σ, mean, var)``, computed in at least float32."""
    x = _wide(x)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)
    inv = lax.rsqrt(var + epsilon)
    return centered * inv, inv, mean, var


def _normalize_backward(x_hat, inv, g, axes):
    """``d_x`` of ``x̂`` given ``g = ∂L/∂x̂``; statistics over ``axes``."""
    return inv * (g - g.mean(axis=axes, keepdims=True) - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))


def _tangent(x_hat, scale, d_params, d_x_hat, dtype):
    """Forward mode (``fbp.linear_pass``): ``d_y = d_γ x̂ + d_β + γ d_x̂``, with ``d_x̂`` the
    normalisation's tangent (or ``None`` when the input does not vary)."""
    d_y = _wide(d_params["scale"]) * x_hat + _wide(d_params["b"])
    return (d_y if d_x_hat is None else d_y + scale * d_x_hat).astype(dtype)


def _second_order(x_hat, inv, scale, d_params, t, d_y, axes, group=None, ungroup=None):
    """The second-order term (``fbp.second_order``): the backward's derivative as ``(x, γ)`` move
    along ``(t, v)``, ``d_y`` held. With ``g = γ d_y`` and ``d_x = inv (g − ⟨g⟩ − x̂ ⟨g x̂⟩)``:
    ``x̂' = inv (t − ⟨t⟩ − x̂ ⟨x̂ t⟩)`` (the tangent: the same formula), ``inv' = −inv² ⟨x̂ t⟩``,
    ``d_x' = inv' (g − ⟨g⟩ − x̂ ⟨g x̂⟩) − inv (x̂' ⟨g x̂⟩ + x̂ ⟨g x̂'⟩) + inv (g' − ⟨g'⟩ − x̂ ⟨g' x̂⟩)``
    with ``g' = v_γ d_y``; ``d_γ' = Σ d_y x̂'``, ``d_β' = 0``. ``axes=None``: evaluation-mode
    BatchNorm, whose statistics are constants (``x̂' = inv t``, ``d_x' = v_γ inv d_y``).
    ``group``/``ungroup`` reshape for GroupNorm's statistics."""
    group = group or (lambda a: a)
    ungroup = ungroup or (lambda a: a)
    d_y = _wide(d_y)
    g_v = group(d_y * _wide(d_params["scale"]))
    if axes is None:
        d_x, x_hat_t = g_v * inv, None if t is None else _wide(t) * inv
    else:
        mean = lambda a: a.mean(axis=axes, keepdims=True)  # noqa: E731
        xg = group(x_hat)
        d_x = _normalize_backward(xg, inv, g_v, axes)
        x_hat_t = None
        if t is not None:
            tg, g = group(_wide(t)), group(d_y * scale)
            x_hat_t = _normalize_backward(xg, inv, tg, axes)
            d_x = d_x - inv * mean(xg * tg) * _normalize_backward(xg, inv, g, axes) - inv * (  # inv'/inv = −inv ⟨x̂ t⟩
                x_hat_t * mean(g * xg) + xg * mean(g * x_hat_t))
            x_hat_t = ungroup(x_hat_t)
    channels = x_hat.shape[-1]
    d_scale = jnp.zeros((channels,), scale.dtype) if x_hat_t is None else \
        (d_y * x_hat_t).reshape(-1, channels).sum(0).astype(scale.dtype)
    return {"scale": d_scale, "b": jnp.zeros((channels,), scale.dtype)}, ungroup(d_x)


def _param_grads(x_hat, d_y, dtype=None):
    """``scale``/``b`` gradients, summed in at least float32, in ``dtype`` (default ``d_y``'s)."""
    channels, dtype = x_hat.shape[-1], dtype or d_y.dtype
    return {"scale": (_wide(d_y) * x_hat).reshape(-1, channels).sum(0).astype(dtype),
            "b": _wide(d_y).reshape(-1, channels).sum(0).astype(dtype)}


def _per_example_param_grads(res, d_y):
    """Per-example ``scale``/``b`` gradients ``(B, C)`` of a per-example normalisation
    (LayerNorm, GroupNorm): the sums of ``d_y ⊙ x̂`` and ``d_y`` over each example's positions;
    in ``fbp.per_example``'s ``(groups, rest)`` form."""
    x_hat, b, c = res.x_hat, d_y.shape[0], d_y.shape[-1]
    return [], {("scale",): (d_y * x_hat).reshape(b, -1, c).sum(1), ("b",): d_y.reshape(b, -1, c).sum(1)}


@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
    """Batch normalisation over every axis but the last (channels).

    Training (``train=True``): batch statistics, full backward through them; the running
    averages are updated by ``next_state``: ``μ_run ← m μ_run + (1 - m) μ_batch`` (same for the
    biased batch variance), ``m = momentum``. Evaluation: the running averages.

    Params ``{"scale": (C,), "b": (C,)}``; state ``{"mean": (C,), "var": (C,)}``.

    Args:
        momentum: weight ``m`` of the old running average in each update (default 0.9, as
            PyTorch's 0.1; 0.99 — Keras's and Flax's — leaves the running statistics near their
            initial values for the first few hundred steps, so evaluation lags training).
        epsilon: added to the variance before the square root (default 1e-5).

    Shapes:
        ``x (N, ..., C) -> y`` of the same shape; statistics over every axis but the last.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    contextual = True

    def __post_init__(self):
        check_fields(self)
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {self.momentum}")
        require_number("BatchNorm", "epsilon", self.epsilon, low=0.0, low_open=True)

    @property
    def has_state(self):
        return True

    def init(self, key, x):
        require_floating(repr(self), x)
        return _scale_bias_init(x)

    def examples_independent(self, train: bool) -> bool:
        """Training mode normalises with the batch's statistics (examples mix); evaluation with
        the running ones (they do not)."""
        return not train

    def init_state(self, params):
        return {"mean": jnp.zeros_like(params["scale"]), "var": jnp.ones_like(params["scale"])}

    def forward(self, params, x, *, state=None, key=None, train=False):
        _check(self, params, x)
        if state is not None:
            self._check_state(state, x)
        axes = tuple(range(x.ndim - 1))
        if train:
            if math.prod(x.shape[:-1]) < 2:
                raise InputError(repr(self), f"training mode needs more than one value per channel to compute "
                                             f"batch statistics, received x {describe(x)} (the output would be all "
                                             f"zeros; PyTorch raises too). Use a batch of 2 or more, or train=False")
            x_hat, inv, mean, var = _normalize(x, axes, self.epsilon)
            stats = BatchStats(mean.reshape(-1), var.reshape(-1))
        else:
            if state is None:
                raise InputError(repr(self), "evaluation mode (train=False) needs the running statistics: pass "
                                             "state=model.init_state(params) (updated by training), or train=True")
            inv = lax.rsqrt(_wide(state["var"]) + self.epsilon)
            x_hat = (_wide(x) - _wide(state["mean"])) * inv
            stats = None
        y = (params["scale"] * x_hat + params["b"]).astype(x.dtype)
        return y, BatchNormRes(x_hat, inv, params["scale"], stats)

    def _check_state(self, state, x):
        c = x.shape[-1]
        for name in ("mean", "var"):
            value = state.get(name) if hasattr(state, "get") else None
            if value is None or tuple(getattr(value, "shape", ())) != (c,):
                got = describe(value) if value is not None else "nothing"
                raise InputError(repr(self), f"state '{name}' must have shape ({c},) for {c} channels (input x "
                                             f"{describe(x)}), received {got}: a state from another model? Make it "
                                             f"with model.init_state(params)")

    def backward(self, res: BatchNormRes, d_y):
        x_hat, inv, scale, stats = res
        g = d_y * scale
        if stats is None:  # evaluation: statistics are constants
            d_x = g * inv
        else:
            d_x = _normalize_backward(x_hat, inv, g, tuple(range(x_hat.ndim - 1)))
        return _param_grads(x_hat, d_y, scale.dtype), d_x.astype(d_y.dtype)

    def tangent(self, res: BatchNormRes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``); ``x ↦ x̂`` has a symmetric Jacobian, so its tangent is its backward."""
        x_hat, inv, scale, stats = res
        if d_x is None:
            d_x_hat = None
        elif stats is None:
            d_x_hat = _wide(d_x) * inv
        else:
            d_x_hat = _normalize_backward(x_hat, inv, _wide(d_x), tuple(range(x_hat.ndim - 1)))
        return _tangent(x_hat, scale, d_params, d_x_hat, scale.dtype if d_x is None else d_x.dtype)

    def backward_tangent(self, res: BatchNormRes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): ``_second_order`` over the batch axes, or with constant statistics."""
        x_hat, inv, scale, stats = res
        axes = None if stats is None else tuple(range(x_hat.ndim - 1))
        d_params_t, d_x_t = _second_order(x_hat, inv, scale, d_params, d_x, d_y, axes)
        return d_params_t, d_x_t.astype(d_y.dtype)

    def next_state(self, state, res):
        stats = res.stats
        if state is None or stats is None:
            return state
        m = self.momentum
        return {"mean": m * state["mean"] + (1 - m) * stats.mean, "var": m * state["var"] + (1 - m) * stats.var}


@dataclasses.dataclass(frozen=True)
class LayerNorm(Layer):
    """Layer normalisation (Ba, Kiros & Hinton, 2016) over the last axis, per example and
    position; same in training and evaluation. Params ``{"scale": (C,), "b": (C,)}``.

    Args:
        epsilon: added to the variance before the square root (default 1e-5).

    Shapes:
        ``x (..., C) -> y`` of the same shape; statistics over the last axis.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    epsilon: float = 1e-5

    def __post_init__(self):
        check_fields(self)
        require_number("LayerNorm", "epsilon", self.epsilon, low=0.0, low_open=True)  # 0: NaN on a constant input

    def init(self, key, x):
        require_floating(repr(self), x)
        return _scale_bias_init(x)

    def forward(self, params, x):
        _check(self, params, x, min_rank=1)
        if x.shape[-1] < 2:
            raise InputError(repr(self), f"normalising over a single feature makes every output equal to the bias "
                                         f"and every input gradient zero; received x {describe(x)}")
        x_hat, inv, _, _ = _normalize(x, (-1,), self.epsilon)
        return (params["scale"] * x_hat + params["b"]).astype(x.dtype), NormRes(x_hat, inv, params["scale"])

    def backward(self, res: NormRes, d_y):
        x_hat, inv, scale = res
        d_x = _normalize_backward(x_hat, inv, d_y * scale, (-1,)).astype(d_y.dtype)
        return _param_grads(x_hat, d_y, scale.dtype), d_x

    def tangent(self, res: NormRes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``); ``x ↦ x̂`` has a symmetric Jacobian, so its tangent is its backward."""
        x_hat, inv, scale = res
        d_x_hat = None if d_x is None else _normalize_backward(x_hat, inv, _wide(d_x), (-1,))
        return _tangent(x_hat, scale, d_params, d_x_hat, scale.dtype if d_x is None else d_x.dtype)

    def backward_tangent(self, res: NormRes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): ``_second_order`` over the features."""
        x_hat, inv, scale = res
        d_params_t, d_x_t = _second_order(x_hat, inv, scale, d_params, d_x, d_y, (-1,))
        return d_params_t, d_x_t.astype(d_y.dtype)

    def per_example_positions(self, res, d_y):
        return _per_example_param_grads(res, d_y)


@dataclasses.dataclass(frozen=True)
class GroupNorm(Layer):
    """Group normalisation (Wu & He, 2018): channels split into ``num_groups`` groups;
    statistics per example and group, over the spatial axes and the group's channels.
    Params ``{"scale": (C,), "b": (C,)}``.

    Args:
        num_groups: ``G``, which must divide the channels (default 32).
        epsilon: added to the variance before the square root (default 1e-5).

    Shapes:
        ``x (N, ..., C) -> y`` of the same shape.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    num_groups: int = 32
    epsilon: float = 1e-5

    def __post_init__(self):
        check_fields(self)
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"GroupNorm: num_groups must be a positive int, got {self.num_groups!r}")
        require_number("GroupNorm", "epsilon", self.epsilon, low=0.0, low_open=True)  # 0: NaN on a constant input

    def init(self, key, x):
        require_floating(repr(self), x)
        return _scale_bias_init(x)

    def _grouped(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise InputError(repr(self), f"channels ({c}) must be divisible by num_groups ({self.num_groups}); "
                                         f"input x {describe(x)}")
        return x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)

    def forward(self, params, x):
        _check(self, params, x)
        xg = self._grouped(x)
        if math.prod(xg.shape[1:-2]) * xg.shape[-1] < 2:
            raise InputError(repr(self), f"each group holds a single value (input x {describe(x)}, {self.num_groups} "
                                         f"groups): every output would equal the bias. Use fewer groups")
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)
        x_hat, inv, _, _ = _normalize(xg, axes, self.epsilon)
        x_hat = x_hat.reshape(x.shape)
        return (params["scale"] * x_hat + params["b"]).astype(x.dtype), NormRes(x_hat, inv, params["scale"])

    def backward(self, res: NormRes, d_y):
        x_hat, inv, scale = res
        xg_hat, g = self._grouped(x_hat), self._grouped(d_y * scale)
        axes = (*range(1, xg_hat.ndim - 2), xg_hat.ndim - 1)
        d_x = _normalize_backward(xg_hat, inv, g, axes).reshape(x_hat.shape).astype(d_y.dtype)
        return _param_grads(x_hat, d_y, scale.dtype), d_x

    def tangent(self, res: NormRes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``); ``x ↦ x̂`` has a symmetric Jacobian, so its tangent is its backward."""
        x_hat, inv, scale = res
        d_x_hat = None
        if d_x is not None:
            xg_hat = self._grouped(x_hat)
            axes = (*range(1, xg_hat.ndim - 2), xg_hat.ndim - 1)
            d_x_hat = _normalize_backward(xg_hat, inv, self._grouped(_wide(d_x)), axes).reshape(x_hat.shape)
        return _tangent(x_hat, scale, d_params, d_x_hat, scale.dtype if d_x is None else d_x.dtype)

    def backward_tangent(self, res: NormRes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): ``_second_order`` over each group's positions and channels."""
        x_hat, inv, scale = res
        xg = self._grouped(x_hat)
        axes = (*range(1, xg.ndim - 2), xg.ndim - 1)
        d_params_t, d_x_t = _second_order(x_hat, inv, scale, d_params, d_x, d_y, axes, self._grouped,
                                          lambda a: a.reshape(x_hat.shape))
        return d_params_t, d_x_t.astype(d_y.dtype)

    def per_example_positions(self, res, d_y):
        return _per_example_param_grads(res, d_y)
