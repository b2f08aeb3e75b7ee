"""Regression losses: MSE, MAE, Huber."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fbp.losses.base import LossBase, reduce_values, reduction_weight
from fbp.validation import check_fields


# --------------------------------------------------------------------------- regression
@dataclasses.dataclass(frozen=True)
class MSE(LossBase):
    """Mean squared error: ``e = (p - t)²``;  ``∂e/∂p = 2 (p - t)``.

    Args:
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
    """

    reduction: str = "mean"
    likelihood = "regression"

    def forward(self, pred, target):
        diff = pred - self._same_shape(pred, target)
        return reduce_values(diff * diff, self.reduction), diff

    def backward(self, res, g=1.0):
        diff = res
        return 2 * diff * reduction_weight(g, diff.shape, self.reduction, diff.dtype)

    def _hessian_diagonal(self, diff):
        return jnp.full_like(diff, 2.0)

    def sampled_hessian_factor(self, pred, target, key, samples: int = 1):
        """Targets ``t̂ ~ N(pred, ½)`` (the Gaussian whose negative log-likelihood is the squared
        error): the gradients ``2 (pred - t̂) = √2 ε`` have covariance ``2 I``."""
        self.forward(pred, target)
        eps = jax.random.normal(key, (*pred.shape, samples), pred.dtype)
        return jnp.sqrt(2 * self._scale(pred))[..., None] * eps / math.sqrt(samples)


@dataclasses.dataclass(frozen=True)
class MAE(LossBase):
    """Mean absolute error: ``e = |p - t|``;  ``∂e/∂p = +1 if p >= t else -1`` (+1 at 0, as jax).

    Args:
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
    """

    reduction: str = "mean"

    def forward(self, pred, target):
        diff = pred - self._same_shape(pred, target)
        return reduce_values(jnp.abs(diff), self.reduction), diff

    def backward(self, res, g=1.0):
        diff = res
        sign = jnp.where(diff >= 0, 1, -1).astype(diff.dtype)
        return sign * reduction_weight(g, diff.shape, self.reduction, diff.dtype)


@dataclasses.dataclass(frozen=True)
class Huber(LossBase):
    """Huber (1964): with ``r = p - t``, ``e = ½ r²`` if ``|r| <= δ`` else ``δ (|r| - ½ δ)``.

    ``∂e/∂p = r`` if ``|r| <= δ`` else ``δ sign(r)`` — i.e. ``clip(r, -δ, δ)``; continuous at
    ``|r| = δ``, where the quadratic branch is taken.

    Args:
        delta: ``δ > 0``, where the quadratic branch meets the linear one (default 1).
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
    """

    delta: float = 1.0
    reduction: str = "mean"

    def __post_init__(self):
        check_fields(self)
        super().__post_init__()
        if not self.delta > 0:
            raise ValueError(f"Huber: delta must be > 0, got {self.delta}")

    def forward(self, pred, target):
        r = pred - self._same_shape(pred, target)
        abs_r = jnp.abs(r)
        e = jnp.where(abs_r <= self.delta, 0.5 * r * r, self.delta * (abs_r - 0.5 * self.delta))
        return reduce_values(e, self.reduction), r

    def backward(self, res, g=1.0):
        r = res
        d_e = jnp.where(jnp.abs(r) <= self.delta, r, self.delta * jnp.sign(r))
        return d_e * reduction_weight(g, r.shape, self.reduction, r.dtype)

    def _hessian_diagonal(self, r):
        return jnp.where(jnp.abs(r) <= self.delta, 1, 0).astype(r.dtype)  # the quadratic branch's 1


