"""Dropout (Srivastava et al., 2014), inverted: ``rate`` is the probability of dropping.

Training: ``m ~ Bernoulli(1 - rate)`` elementwise, ``y = m x / (1 - rate)`` (so E[y] = x) and
``d_x = m d_y / (1 - rate)``; the residual is the mask. Evaluation: the identity. The key is
explicit: a model gets one key per step and ``Serial`` splits it per layer, so no mask is
ever reused across steps or layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fbp.core import NO_RESIDUAL, InputError, ParameterFree, require_floating, require_key, require_no_params
from fbp.validation import check_fields


@dataclasses.dataclass(frozen=True)
class Dropout(ParameterFree):
    """Drop each element with probability ``rate`` in training; identity in evaluation (then the
    residual is ``NO_RESIDUAL``).

    Args:
        rate: the probability of dropping each element in training, in ``[0, 1)``; the kept ones are scaled by
            ``1 / (1 - rate)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    piecewise_linear = True
    self_adjoint = True  # d_x = mask ⊙ d_y / (1 - rate): diagonal, so the tangent is the backward (fbp.linear_pass)

    rate: float
    contextual = True

    def __post_init__(self):
        check_fields(self)
        if not 0 <= self.rate < 1:
            raise ValueError(f"Dropout: rate (the probability of dropping) must be in [0, 1), got {self.rate}")

    @property
    def needs_key(self):
        return self.rate > 0

    def forward(self, params, x, *, state=None, key=None, train=False):
        require_no_params(self, params)
        require_floating(repr(self), x)
        if not train or self.rate == 0:
            return x, NO_RESIDUAL
        if key is None:
            raise InputError(repr(self), "training mode needs a random key: pass key=... to value_and_grad / apply "
                                         "(fbp.train.fit passes a fresh one every step)")
        require_key(repr(self), key)
        keep = jax.random.bernoulli(key, 1 - self.rate, x.shape)
        return jnp.where(keep, x / (1 - self.rate), jnp.zeros_like(x)), keep

    def backward(self, keep, d_y):
        if isinstance(keep, tuple):  # NO_RESIDUAL: evaluation mode
            return {}, d_y
        return {}, jnp.where(keep, d_y / (1 - self.rate), jnp.zeros_like(d_y))
