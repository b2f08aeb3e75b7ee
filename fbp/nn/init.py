"""Weight initializers: ``initializer(key, shape, dtype) -> array``.

Fans follow the convention of ``jax.nn.initializers`` for a kernel of shape
``(*receptive_field, fan_in_channels, fan_out_channels)``::

    fan_in  = prod(receptive_field) * shape[-2]
    fan_out = prod(receptive_field) * shape[-1]

Variance scaling draws with variance ``scale / n`` where ``n`` is ``fan_in``, ``fan_out`` or
their mean:

================  =========  ========  ==================  =================================
initializer       scale      n         distribution        reference
================  =========  ========  ==================  =================================
glorot_uniform    1          fan_avg   uniform             Glorot & Bengio (2010)
glorot_normal     1          fan_avg   truncated normal    Glorot & Bengio (2010)
he_uniform        2          fan_in    uniform             He et al. (2015)
he_normal         2          fan_in    truncated normal    He et al. (2015)
lecun_uniform     1          fan_in    uniform             LeCun et al. (1998)
lecun_normal      1          fan_in    truncated normal    LeCun et al. (1998)
================  =========  ========  ==================  =================================

A uniform draw on ``[-a, a]`` has variance ``a²/3``, so ``a = sqrt(3 scale / n)``. The
truncated normal is cut at two standard deviations and rescaled (by 1/0.87962566...) so that
its variance is the one asked for, as in ``jax.nn.initializers``.

``xavier_*`` and ``kaiming_*`` are aliases. Unlike ``jax.nn.initializers.uniform`` (which
draws from ``[0, scale)``), :func:`uniform` here is symmetric: ``[-scale, scale)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

# std of a standard normal truncated to [-2, 2]
_TRUNCATED_NORMAL_STD = 0.87962566103423978


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    if len(shape) < 1:
        return 1.0, 1.0
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    receptive = math.prod(shape[:-2])
    return float(receptive * shape[-2]), float(receptive * shape[-1])


def variance_scaling(scale: float, mode: str, distribution: str) -> Initializer:
    """Draw with variance ``scale / n``; ``mode`` in fan_in/fan_out/fan_avg,
    ``distribution`` in uniform/normal/truncated_normal."""
    if mode not in ("fan_in", "fan_out", "fan_avg"):
        raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
    if distribution not in ("uniform", "normal", "truncated_normal"):
        raise ValueError(f"distribution must be 'uniform', 'normal' or 'truncated_normal', got {distribution!r}")

    def initializer(key, shape, dtype=jnp.float32):
        fan_in, fan_out = _fans(tuple(shape))
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        variance = scale / max(n, 1.0)
        if distribution == "uniform":
            limit = math.sqrt(3.0 * variance)
            return jax.random.uniform(key, shape, dtype, -limit, limit)
        if distribution == "normal":
            return math.sqrt(variance) * jax.random.normal(key, shape, dtype)
        std = math.sqrt(variance) / _TRUNCATED_NORMAL_STD
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

    return initializer


glorot_uniform = variance_scaling(1.0, "fan_avg", "uniform")
glorot_normal = variance_scaling(1.0, "fan_avg", "truncated_normal")
he_uniform = variance_scaling(2.0, "fan_in", "uniform")
he_normal = variance_scaling(2.0, "fan_in", "truncated_normal")
lecun_uniform = variance_scaling(1.0, "fan_in", "uniform")
lecun_normal = variance_scaling(1.0, "fan_in", "truncated_normal")
xavier_uniform, xavier_normal = glorot_uniform, glorot_normal
kaiming_uniform, kaiming_normal = he_uniform, he_normal


def zeros(key, shape, dtype=jnp.float32):
    """All zeros (the usual bias initializer)."""
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype=jnp.float32):
    """All ones (the usual scale initializer of a normalisation layer)."""
    return jnp.ones(shape, dtype)


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``."""
    return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


def normal(stddev: float = 1e-2) -> Initializer:
    """Normal with mean 0 and standard deviation ``stddev``."""
    if stddev < 0:
        raise ValueError(f"stddev must be >= 0, got {stddev}")
    return lambda key, shape, dtype=jnp.float32: stddev * jax.random.normal(key, shape, dtype)


def uniform(scale: float = 1e-2) -> Initializer:
    """Uniform on ``[-scale, scale)`` (symmetric; e.g. the 1986 paper's ±0.3)."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


def orthogonal(scale: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``scale`` (Saxe et al., 2014), from the QR decomposition
    of a Gaussian matrix with the signs of R's diagonal fixed — the usual recurrent-kernel init."""

    def initializer(key, shape, dtype=jnp.float32):
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32)
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diag(r))
        q = q if rows >= cols else q.T
        return (scale * q[:rows, :cols]).reshape(shape).astype(dtype)

    return initializer
