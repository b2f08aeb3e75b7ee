"""Initializers: variance, bounds, fans, dtypes."""

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
