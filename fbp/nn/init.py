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

Every initializer is a ``Named`` value: it prints as the call that made it
(``normal(stddev=0.02)``, not a function address) and two made by the same call are equal, so a
layer holding one stays equal and hashable (static under ``jit``) and readable in reports.

**Eager draws share their random-number programs.** Called outside ``jit``, a draw compiles one
program per shape, and a model's first ``init`` used to spend most of its time compiling them.
With JAX's default PRNG (threefry, partitionable: ``jax_threefry_partitionable``), entry ``i`` of
a draw depends only on the key and ``i``, not on the shape, so ``draw_by_length`` draws the next
power-of-two length and keeps the first ``prod(shape)`` entries: the numbers are identical, bit
for bit, and the shapes of a model share a handful of programs. Under a trace (``jit``,
``vmap``) or with another PRNG the draw is direct.

``xavier_*`` and ``kaiming_*`` are aliases. Unlike ``jax.nn.initializers.uniform`` (which
draws from ``[0, scale)``), ``uniform`` here is symmetric: ``[-scale, scale)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

@dataclasses.dataclass(frozen=True)
class Named:
    """An initializer with a readable name: ``name`` is how it prints and what equality compares.

    Args:
        name: e.g. ``"glorot_uniform"``.
        fn: ``fn(key, shape, dtype) -> array``.
    """

    name: str
    fn: Callable = dataclasses.field(compare=False)

    def __call__(self, key, shape, dtype=jnp.float32):
        return self.fn(key, shape, dtype)

    def __repr__(self) -> str:
        return self.name


# Longer draws are made as asked: their cost is the drawing, not the compiling.
_LONGEST_BUCKET = 1 << 22


def draw_by_length(sample: Callable, key, shape, dtype, *args) -> jax.Array:
    """``sample(key, shape, dtype, *args)``, drawn eagerly as a prefix of a power-of-two-long draw.

    The result is bitwise the direct draw whenever the key is a concrete threefry key and
    ``jax_threefry_partitionable`` is on (JAX's default); otherwise, and under a trace, the draw
    is direct. Entry ``i`` of a partitionable threefry draw is a function of the key and ``i``
    alone, so for ``n = prod(shape)`` and ``m = 2^ceil(log2 n)``::

        sample(key, shape) == sample(key, (m,))[:n].reshape(shape)

    and every ``n`` in ``(m/2, m]`` shares the program compiled for length ``m``.

    Args:
        sample: ``jax.random.normal``, ``uniform``, ``truncated_normal`` or another sampler whose
            entries are elementwise functions of the random bits, called ``sample(key, shape, dtype, *args)``.
        key: a PRNG key.
        shape: the shape asked for.
        dtype: the floating dtype.
        *args: passed on after ``dtype`` (e.g. ``minval, maxval`` of ``uniform``).

    Returns:
        An array of ``shape`` and ``dtype``.
    """
    shape = tuple(shape)
    n = math.prod(shape)
    if n < 2 or n > _LONGEST_BUCKET or not _prefix_consistent(key):
        return sample(key, shape, dtype, *args)
    return _prefix(sample(key, (1 << (n - 1).bit_length(),), dtype, *args), shape)


def _prefix_consistent(key) -> bool:
    if isinstance(key, jax.core.Tracer) or not jax.config.jax_threefry_partitionable:
        return False
    try:
        return str(jax.random.key_impl(key)) == "threefry2x32"
    except (TypeError, ValueError):  # not a key: the direct draw raises JAX's own error
        return False


@functools.partial(jax.jit, static_argnums=1)
def _prefix(flat, shape):
    return flat[:math.prod(shape)].reshape(shape)


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
    ``distribution`` in uniform/normal/truncated_normal.

    Args:
        scale: the variance's numerator.
        mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``: which ``n``.
        distribution: ``"uniform"``, ``"normal"`` or ``"truncated_normal"``.

    Returns:
        An initializer ``f(key, shape, dtype) -> array`` (an ``nn.init.Named``, printed as the call that made it).
    """
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
            return draw_by_length(jax.random.uniform, key, shape, dtype, -limit, limit)
        if distribution == "normal":
            return math.sqrt(variance) * draw_by_length(jax.random.normal, key, shape, dtype)
        std = math.sqrt(variance) / _TRUNCATED_NORMAL_STD
        return std * draw_by_length(_truncated_normal, key, shape, dtype)

    return Named(f"variance_scaling({scale!r}, {mode!r}, {distribution!r})", initializer)


def _truncated_normal(key, shape, dtype):
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)


def _renamed(init: Named, name: str) -> Named:
    return Named(name, init.fn)


glorot_uniform = _renamed(variance_scaling(1.0, "fan_avg", "uniform"), "glorot_uniform")
glorot_normal = _renamed(variance_scaling(1.0, "fan_avg", "truncated_normal"), "glorot_normal")
he_uniform = _renamed(variance_scaling(2.0, "fan_in", "uniform"), "he_uniform")
he_normal = _renamed(variance_scaling(2.0, "fan_in", "truncated_normal"), "he_normal")
lecun_uniform = _renamed(variance_scaling(1.0, "fan_in", "uniform"), "lecun_uniform")
lecun_normal = _renamed(variance_scaling(1.0, "fan_in", "truncated_normal"), "lecun_normal")
xavier_uniform, xavier_normal = glorot_uniform, glorot_normal
kaiming_uniform, kaiming_normal = he_uniform, he_normal


zeros = Named("zeros", lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype))
"""All zeros (the usual bias initializer)."""

ones = Named("ones", lambda key, shape, dtype=jnp.float32: jnp.ones(shape, dtype))
"""All ones (the usual scale initializer of a normalisation layer)."""


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``.

    Args:
        value: every entry.

    Returns:
        An initializer ``f(key, shape, dtype) -> array`` (an ``nn.init.Named``, printed as the call that made it).
    """
    return Named(f"constant({value!r})", lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype))


def normal(stddev: float = 1e-2) -> Initializer:
    """Normal with mean 0 and standard deviation ``stddev``.

    Args:
        stddev: the standard deviation.

    Returns:
        An initializer ``f(key, shape, dtype) -> array`` (an ``nn.init.Named``, printed as the call that made it).
    """
    if stddev < 0:
        raise ValueError(f"stddev must be >= 0, got {stddev}")

    def initializer(key, shape, dtype=jnp.float32):
        return stddev * draw_by_length(jax.random.normal, key, shape, dtype)

    return Named(f"normal({stddev!r})", initializer)


def uniform(scale: float = 1e-2) -> Initializer:
    """Uniform on ``[-scale, scale)`` (symmetric; e.g. the 1986 paper's ±0.3).

    Args:
        scale: the half-width of the interval.

    Returns:
        An initializer ``f(key, shape, dtype) -> array`` (an ``nn.init.Named``, printed as the call that made it).
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")

    def initializer(key, shape, dtype=jnp.float32):
        return draw_by_length(jax.random.uniform, key, shape, dtype, -scale, scale)

    return Named(f"uniform({scale!r})", initializer)


def orthogonal(scale: float = 1.0) -> Initializer:
    """A (semi-)orthogonal matrix times ``scale`` (Saxe et al., 2014), from the QR decomposition
    of a Gaussian matrix with the signs of R's diagonal fixed — the usual recurrent-kernel init.

    Args:
        scale: the factor on the orthogonal matrix.

    Returns:
        An initializer ``f(key, shape, dtype) -> array`` (an ``nn.init.Named``, printed as the call that made it).
    """

    def initializer(key, shape, dtype=jnp.float32):
        rows, cols = math.prod(shape[:-1]), shape[-1]
        a = jax.random.normal(key, (max(rows, cols), min(rows, cols)), jnp.float32)
        q, r = jnp.linalg.qr(a)
        q = q * jnp.sign(jnp.diag(r))
        q = q if rows >= cols else q.T
        return (scale * q[:rows, :cols]).reshape(shape).astype(dtype)

    return Named(f"orthogonal({scale!r})", initializer)
