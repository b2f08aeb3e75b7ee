"""Convolutions vs jax.grad over strides, padding, dilation, groups and odd sizes; errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn

CONFIGS = [dict(strides=s, padding=p, dilation=d, feature_group_count=g)
           for s, p, d, g in itertools.product([1, 2], ["SAME", "VALID", ((1, 2), (0, 1))], [1, 2], [1, 2])]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_conv2d_geometries_match_jax(config):
    layer = nn.Conv2D(4, (3, 2), **config)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 4))  # odd sizes
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x, jit=True)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2D(3, 3), (2, 5, 5, 2)), (nn.Conv1D(4, 3, strides=2, dilation=2), (3, 11, 2)),
    (nn.Conv1D(6, 5, padding="VALID", feature_group_count=3), (2, 9, 3)),
    (nn.ConvTranspose2D(3, 3, strides=2), (2, 4, 5, 2)), (nn.ConvTranspose2D(2, (2, 3), strides=(3, 1),
                                                                          padding="VALID"), (1, 3, 4, 3)),
    (nn.Conv2D(4, 3, use_bias=False, feature_group_count=4), (2, 6, 6, 4)),
    # wide patches (taps x channels > 64): the kernel gradient loops over offsets
    (nn.Conv2D(5, 3, strides=2, dilation=2), (2, 9, 8, 16)), (nn.Conv1D(3, 5, strides=3, padding="VALID"), (2, 17, 16)),
    (nn.Conv2D(4, (3, 2), padding=((2, 0), (1, 3)), strides=(1, 2)), (2, 7, 7, 40))])
def test_conv_layers_match_jax(layer, shape, dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x, dtype=dtype, jit=jit)


def test_forward_matches_lax_and_output_shapes():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    layer = nn.Conv2D(5, 3, strides=2)
    p = layer.init(jax.random.PRNGKey(1), x)
    ref = jax.lax.conv_general_dilated(x, p["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.apply(p, x), ref + p["b"], rtol=1e-5, atol=1e-6)
    t = nn.ConvTranspose2D(3, 3, strides=2)
    pt = t.init(jax.random.PRNGKey(2), x)
    assert t.apply(pt, x).shape == (2, 16, 16, 3)
    ref_t = jax.lax.conv_transpose(x, pt["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(t.apply(pt, x), ref_t + pt["b"], rtol=1e-5, atol=1e-6)


def test_errors_name_layer_and_shapes():
    layer = nn.Conv2D(4, 3)
    with pytest.raises(fbp.InputError, match=r"rank 4 \(NHWC, channels last\), received \(8, 8, 3\) float32"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((8, 8, 3)))
    p = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))
    with pytest.raises(fbp.InputError, match=r"parameter 'w' expected shape \(3, 3, 5, 4\).*expects 3 input "
                                             r"channels, the input has 5"):
        layer.apply(p, jnp.ones((1, 8, 8, 5)))
    with pytest.raises(fbp.InputError, match=r"window \(5, 5\) is larger than the padded input \(3, 3\)"):
        nn.Conv2D(2, 5, padding="VALID").init(jax.random.PRNGKey(0), jnp.ones((1, 3, 3, 1)))
    with pytest.raises(fbp.InputError, match="divisible by feature_group_count"):
        nn.Conv2D(4, 3, feature_group_count=2).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="kernel_size must be"):
        nn.Conv2D(4, (3, 3, 3))
