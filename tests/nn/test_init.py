"""Initializers: variance, bounds, fans, dtypes, and draws bitwise jax.random's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import nn
from fbp.nn import init

SHAPE = (400, 300)
FAN_IN, FAN_OUT = 400, 300


@pytest.mark.parametrize("name, variance", [
    ("glorot_uniform", 2 / (FAN_IN + FAN_OUT)), ("glorot_normal", 2 / (FAN_IN + FAN_OUT)),
    ("he_uniform", 2 / FAN_IN), ("he_normal", 2 / FAN_IN), ("lecun_uniform", 1 / FAN_IN),
    ("lecun_normal", 1 / FAN_IN), ("xavier_uniform", 2 / (FAN_IN + FAN_OUT)), ("kaiming_normal", 2 / FAN_IN)])
def test_variance_scaling(name, variance):
    w = getattr(init, name)(jax.random.PRNGKey(0), SHAPE, jnp.float32)
    assert w.shape == SHAPE and w.dtype == jnp.float32
    np.testing.assert_allclose(float(w.var()), variance, rtol=0.03)
    assert abs(float(w.mean())) < 0.01 * np.sqrt(variance) * 10
    if "normal" in name:  # truncated at two standard deviations
        assert float(jnp.abs(w).max()) <= 2 * np.sqrt(variance) / 0.87962566103423978 + 1e-6


def test_conv_kernel_fans_include_receptive_field():
    w = init.he_normal(jax.random.PRNGKey(0), (3, 3, 64, 128), jnp.float32)
    np.testing.assert_allclose(float(w.var()), 2 / (9 * 64), rtol=0.03)


def test_simple_initializers():
    key = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(init.zeros(key, (2, 3)), 0)
    np.testing.assert_array_equal(init.ones(key, (2, 3)), 1)
    np.testing.assert_array_equal(init.constant(0.5)(key, (2,)), 0.5)
    u = init.uniform(0.3)(key, (10000,))
    assert float(u.min()) >= -0.3 and float(u.max()) < 0.3 and float(u.min()) < -0.25
    np.testing.assert_allclose(float(init.normal(0.1)(key, (20000,)).std()), 0.1, rtol=0.03)


def test_dtype_is_respected_and_bad_arguments_raise():
    with jax.enable_x64(True):
        assert init.he_uniform(jax.random.PRNGKey(0), (3, 3), jnp.float64).dtype == jnp.float64
    with pytest.raises(ValueError):
        init.normal(-1.0)
    with pytest.raises(ValueError):
        init.variance_scaling(1.0, "fan_sideways", "normal")


def test_initializers_print_as_the_call_that_made_them_and_compare_by_it():
    assert repr(init.normal(0.02)) == "normal(0.02)" and init.normal(0.02) == init.normal(0.02)
    assert init.normal(0.02) != init.normal(0.03) and repr(init.glorot_uniform) == "glorot_uniform"
    assert nn.Dense(3, kernel_init=init.he_normal) == nn.Dense(3, kernel_init=init.he_normal)
    assert hash(nn.LearnedPositionalEmbedding(8)) == hash(nn.LearnedPositionalEmbedding(8))


def test_no_layer_of_the_catalogue_prints_a_function_address():
    from fbp import catalog

    for layer, *_ in catalog.layers() + catalog.contextual_layers():
        assert " at 0x" not in repr(layer), repr(layer)


def _direct(name, key, shape, dtype):
    """What each initializer drew before draws were bucketed by length: ``jax.random`` called directly."""
    fan_in, fan_out = init._fans(shape)
    if name == "glorot_uniform":
        limit = math.sqrt(3.0 * (1.0 / max((fan_in + fan_out) / 2, 1.0)))
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    if name == "he_normal":
        std = math.sqrt(2.0 / max(fan_in, 1.0)) / 0.87962566103423978
        return std * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)
    if name == "lecun_plain_normal":
        return math.sqrt(1.0 / max(fan_in, 1.0)) * jax.random.normal(key, shape, dtype)
    if name == "normal(0.1)":
        return 0.1 * jax.random.normal(key, shape, dtype)
    return jax.random.uniform(key, shape, dtype, -0.2, 0.2)


INITIALIZERS = {"glorot_uniform": init.glorot_uniform, "he_normal": init.he_normal,
                "lecun_plain_normal": init.variance_scaling(1.0, "fan_in", "normal"),
                "normal(0.1)": init.normal(0.1), "uniform(0.2)": init.uniform(0.2)}
# sizes 0 and 1, powers of two and one past them, in ranks 0 to 4
SHAPES = [(), (0, 3), (1, 1), (3, 3), (4, 8), (17, 16), (3, 3, 4, 5), (2, 1, 3, 2)]


def test_eager_draws_are_bitwise_the_direct_draws():
    """Drawn eagerly by length bucket, every initializer gives jax.random's own numbers, for raw and
    typed keys in float32, float64 and bfloat16 (each shape in one of them: each shape compiles)."""
    for seed, shape in enumerate(SHAPES):
        key = jax.random.PRNGKey(seed) if seed % 2 else jax.random.key(seed)
        dtype = (jnp.float32, jnp.float64, jnp.bfloat16)[seed % 3]
        with jax.enable_x64(dtype == jnp.float64):
            for name, f in INITIALIZERS.items():
                got, want = f(key, shape, dtype), _direct(name, key, shape, dtype)
                assert got.shape == shape and got.dtype == want.dtype == dtype, (name, shape)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{name} {shape} {dtype}")


def test_draws_are_bucketed_eagerly_and_direct_where_a_prefix_would_differ(monkeypatch):
    asked = []
    normal = jax.random.normal
    monkeypatch.setattr(jax.random, "normal", lambda key, shape, dtype: asked.append(shape) or normal(key, shape,
                                                                                                        dtype))
    key = jax.random.PRNGKey(0)
    for shape in [(5, 7), (6, 6), (64,)]:
        init.normal(0.1)(key, shape)
    assert asked == [(64,)] * 3  # sizes 35, 36 and 64 share the length-64 program
    jax.jit(init.normal(0.1), static_argnums=(1,))(key, (5, 7))
    assert asked[-1] == (5, 7)  # under a trace: direct
    with jax.threefry_partitionable(False):  # a prefix of a longer draw would be other numbers
        got = init.normal(0.1)(key, (5, 7))
        assert asked[-1] == (5, 7)
        np.testing.assert_array_equal(got, 0.1 * normal(key, (5, 7), jnp.float32))
    init.normal(0.1)(jax.random.key(0, impl="rbg"), (5, 7))
    assert asked[-1] == (5, 7)  # only threefry is known to be prefix-consistent
