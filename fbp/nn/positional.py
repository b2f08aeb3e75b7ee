"""Positional embeddings for sequence models: a learned table, and the fixed sinusoidal one
(Vaswani et al., 2017). Both add to the input, ``y = x + P[:T]``, so the input cotangent is the
output's and the tangent adds the table's."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp

from fbp.core import InputError, Layer, ParameterFree, check_params, describe, require_floating
from fbp.nn import init as initializers


@dataclasses.dataclass(frozen=True)
class LearnedPositionalEmbedding(Layer):
    """``y[:, t] = x[:, t] + P[t]`` with a learned table ``P (max_len, d)``;
    ``d_P[t] = Σ_batch d_y[:, t]`` for ``t < T``, ``d_x = d_y``.

    Args:
        max_len: the longest sequence the table covers.
        embedding_init: initializer of the table (default N(0, 0.02²)).

    Shapes:
        ``x (B, T, d) -> y (B, T, d)`` with ``T <= max_len``; params ``{"table": (max_len, d)}``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    max_len: int
    embedding_init: Callable = initializers.normal(0.02)

    def init(self, key, x):
        require_floating(repr(self), x)
        return {"table": self.embedding_init(key, (self.max_len, x.shape[-1]), x.dtype)}

    def forward(self, params, x):
        require_floating(repr(self), x)
        if x.ndim != 3 or x.shape[1] > self.max_len:
            raise InputError(repr(self), f"input must be (batch, time <= {self.max_len}, d), received {describe(x)}")
        check_params(repr(self), params, {"table": (self.max_len, x.shape[-1])}, x)
        return x + params["table"][: x.shape[1]], x.shape

    def backward(self, x_shape, d_y):
        d_table = jnp.zeros((self.max_len, x_shape[-1]), d_y.dtype).at[: d_y.shape[1]].set(d_y.sum(0))
        return {"table": d_table}, d_y

    def tangent(self, x_shape, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): ``ẏ[:, t] = ẋ[:, t] + Ṗ[t]``."""
        rows = d_params["table"][: x_shape[1]]
        return jnp.broadcast_to(rows, x_shape) if d_x is None else d_x + rows

    def backward_tangent(self, x_shape, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): zero — the backward depends on neither the table nor ``x``."""
        return {"table": jnp.zeros_like(d_params["table"])}, None

    def per_example_positions(self, x_shape, d_y):
        """Per-example rule (``fbp.nn.positions``): example ``b``'s table gradient is ``d_y[b]``
        in the first ``T`` rows."""
        per = jnp.zeros((d_y.shape[0], self.max_len, x_shape[-1]), d_y.dtype).at[:, : d_y.shape[1]].set(d_y)
        return [], {("table",): per}


def sinusoidal_table(length: int, d: int, dtype=jnp.float32):
    """The sinusoidal position table of Vaswani et al. (2017).

    ``PE[t, 2i] = sin(t / 10000^{2i/d})``, ``PE[t, 2i+1] = cos(t / 10000^{2i/d})``.

    Args:
        length: the number of positions.
        d: the model width.
        dtype: the table's dtype (computed in float32).

    Returns:
        ``(length, d)``.
    """
    position = jnp.arange(length, dtype=jnp.float32)[:, None]
    rate = jnp.exp(-math.log(10000.0) * jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    table = jnp.zeros((length, d), jnp.float32)
    table = table.at[:, 0::2].set(jnp.sin(position * rate))
    table = table.at[:, 1::2].set(jnp.cos(position * rate[: d // 2]))
    return table.astype(dtype)


@dataclasses.dataclass(frozen=True)
class SinusoidalPositionalEmbedding(ParameterFree):
    """``y = x + PE`` with the fixed sinusoidal table; no parameters; ``d_x = d_y``."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # d_x = d_y: the tangent is the backward (fbp.linear_pass)
    piecewise_linear = True  # affine in x: no second-order term (fbp.second_order, diag_hessian)

    def _forward(self, x):
        if x.ndim != 3:
            raise InputError(repr(self), f"input must be (batch, time, d), received {describe(x)}")
        return x + sinusoidal_table(x.shape[1], x.shape[2], x.dtype), None

    def _backward(self, res, d_y):
        return d_y
