"""fbp.gaussian_noise against JAX's own non-partitionable Threefry normal, bit for bit; the
draw's statistics, the independence of a block's two words, and planted errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.random import threefry2x32_p

from fbp import gaussian_noise

SHAPES = [(1024, 1024), (6, 5, 4), (3, 3, 4, 8), (7,), (9, 5), (1,), (), (2,)]


def _reference(key, shape, dtype=jnp.float32):
    with jax.threefry_partitionable(False):
        return jax.random.normal(key, shape, dtype)


@pytest.mark.parametrize("jit", [False, True])
def test_the_draw_is_jax_s_own_threefry_normal_bit_for_bit(jit):
    draw = jax.jit(gaussian_noise.normal, static_argnums=(1, 2)) if jit else gaussian_noise.normal
    for i, shape in enumerate(SHAPES if jit else SHAPES[1:]):  # eager: every op dispatched alone
        for key in (jax.random.key(i), jax.random.PRNGKey(100 + i)):  # typed and raw keys
            got, want = draw(key, shape, jnp.float32), _reference(key, shape)
            assert got.shape == shape and got.dtype == jnp.float32
            np.testing.assert_array_equal(got, want, err_msg=str(shape))
    # the same draw differs from the partitionable one (so the test above is not vacuous) and by key
    key = jax.random.key(0)
    assert not np.array_equal(gaussian_noise.normal(key, (64,)), jax.random.normal(key, (64,)))
    assert not np.array_equal(gaussian_noise.normal(key, (64,)), gaussian_noise.normal(jax.random.key(1), (64,)))


def test_other_dtypes_and_key_implementations_keep_the_layout():
    key = jax.random.key(3)
    for dtype in (jnp.bfloat16, jnp.float16):
        np.testing.assert_array_equal(gaussian_noise.normal(key, (6, 4), dtype), _reference(key, (6, 4), dtype))
    with jax.enable_x64(True):
        got = gaussian_noise.normal(key, (5, 3), jnp.float64)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(got, _reference(key, (5, 3), jnp.float64))
    rbg = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(gaussian_noise.normal(rbg, (6, 4)), jax.random.normal(rbg, (6, 4)))
    assert gaussian_noise.normal(key, (0, 3)).shape == (0, 3)


def _words_correlation(z):
    """Correlation of the entries fed by the two words of the same blocks: ``z[j]`` and ``z[m + j]``."""
    flat = np.asarray(z, np.float64).ravel()
    m = flat.size // 2
    return np.corrcoef(flat[:m], flat[m:2 * m])[0, 1]


def _same_word_twice(key, shape):  # a planted error: the block's first word feeds both halves
    data = jax.random.key_data(key)
    n = math.prod(shape)
    counter = lax.iota(jnp.uint32, n // 2)
    first, _ = threefry2x32_p.bind(data[0], data[1], counter, counter + np.uint32(n // 2))
    return gaussian_noise._uniform_to_normal(jnp.concatenate([first, first])).reshape(shape)


def test_statistics_and_independence_catch_planted_errors():
    key = jax.random.key(11)
    z = np.asarray(gaussian_noise.normal(key, (1000, 400)), np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(z ** 4) - 3) < 5 * math.sqrt(96 / n)  # kurtosis of a normal
    probabilities = np.array([math.erf(t / math.sqrt(2)) for t in (0.5, 1.0, 2.0, 3.0)])
    observed = np.array([np.mean(np.abs(z) < t) for t in (0.5, 1.0, 2.0, 3.0)])
    assert np.all(np.abs(observed - probabilities) < 5 * np.sqrt(probabilities * (1 - probabilities) / n))
    assert abs(_words_correlation(z)) < 5 / math.sqrt(n / 2)  # the two words of each block
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / math.sqrt(n)  # neighbours
    other = np.asarray(gaussian_noise.normal(jax.random.fold_in(key, 1), (1000, 400)), np.float64).ravel()
    assert abs(np.corrcoef(z, other)[0, 1]) < 5 / math.sqrt(n)  # another key
    bad = _same_word_twice(key, (1000, 400))  # the same statistics, but each block's word used twice
    assert abs(float(jnp.mean(bad))) < 0.01 and _words_correlation(bad) > 0.99
    # and the bitwise reference catches a shifted counter (the blocks (j, j+m) hashed as (j+1, j+m))
    data = jax.random.key_data(key)
    counter = lax.iota(jnp.uint32, 6)
    first, second = threefry2x32_p.bind(data[0], data[1], counter + np.uint32(1), counter + np.uint32(6))
    shifted = gaussian_noise._uniform_to_normal(jnp.concatenate([first, second]))
    assert not np.array_equal(shifted, _reference(key, (12,)))


def test_noisy_mean_splits_one_key_per_leaf():
    sums = {"a": jnp.ones((4, 3)), "b": jnp.full((5,), 2.0)}
    key = jax.random.key(5)
    got = jax.jit(gaussian_noise.noisy_mean, static_argnums=(2, 3))(key, sums, 0.5, 4.0)
    keys = jax.random.split(key, 2)
    for (name, s), k in zip(sorted(sums.items()), keys, strict=True):
        np.testing.assert_allclose(got[name], (s + 0.5 * _reference(k, s.shape)) / 4.0, rtol=1e-6)
    assert gaussian_noise.noisy_mean(key, {}, 1.0, 1.0) == {}
