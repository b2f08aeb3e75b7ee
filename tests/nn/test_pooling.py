"""Pooling and shape layers vs jax.grad, ties included; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn

POOLS = [nn.MaxPool2D(2), nn.MaxPool2D(2, padding="SAME"), nn.MaxPool2D(3, strides=2), nn.MaxPool2D((2, 3), strides=1),
         nn.MaxPool2D(3, strides=(1, 2), padding="SAME"), nn.AvgPool2D(2), nn.AvgPool2D(3, strides=2, padding="SAME"),
         nn.AvgPool2D((3, 2), strides=1, padding="SAME"), nn.AvgPool2D(2, strides=1)]


@pytest.mark.parametrize("layer", POOLS, ids=[repr(p) for p in POOLS])
@pytest.mark.parametrize("shape", [(2, 7, 6, 3), (1, 4, 5, 2)])
def test_pools_match_jax(layer, shape, dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
    fbp.check.assert_layer(layer, {}, x, dtype=dtype, jit=jit, fd=isinstance(layer, nn.AvgPool2D))


@pytest.mark.parametrize("layer", POOLS[:5], ids=[repr(p) for p in POOLS[:5]])
def test_max_pool_ties_follow_jax_exactly(layer):
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 7, 6, 3), 0, 2).astype(jnp.float32)  # many ties
    d_y = jax.random.normal(jax.random.PRNGKey(2), layer.apply({}, x).shape)
    _, d_x = layer.backward(layer.forward({}, x)[1], d_y)
    ref = jax.vjp(lambda v: layer.apply({}, v), x)[1](d_y)[0]
    np.testing.assert_allclose(d_x, ref, rtol=1e-6, atol=1e-7)


def test_tie_convention_splits_equally():
    x = jnp.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)
    _, d_x = nn.MaxPool2D(2).backward(nn.MaxPool2D(2).forward({}, x)[1], jnp.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(d_x.reshape(2, 2), [[0.0, 0.5], [0.5, 0.0]])


def test_same_average_counts_valid_cells_only():
    y = nn.AvgPool2D(2, padding="SAME").apply({}, jnp.ones((1, 3, 3, 1)))
    np.testing.assert_allclose(y, 1.0)  # corners average one or two real cells, never padding


@pytest.mark.parametrize("layer, shape", [(nn.GlobalAvgPool(), (2, 3, 4, 5)), (nn.GlobalAvgPool(), (2, 7, 3)),
                                          (nn.Flatten(), (2, 3, 4, 5)), (nn.Reshape((5, -1)), (2, 10, 2))])
def test_shape_layers_match_jax(layer, shape, dtype):
    fbp.check.assert_layer(layer, {}, jax.random.normal(jax.random.PRNGKey(0), shape, dtype), dtype=dtype)


def test_errors():
    with pytest.raises(fbp.InputError, match=r"window \(3, 3\) is larger than the padded input \(2, 2\)"):
        nn.MaxPool2D(3).apply({}, jnp.ones((1, 2, 2, 1)))
    with pytest.raises(fbp.InputError, match="rank 4"):
        nn.AvgPool2D(2).apply({}, jnp.ones((4, 4, 1)))
    with pytest.raises(fbp.InputError, match=r"cannot reshape input x \(2, 6\) float32 to \(N, \*\(4, -1\)\)"):
        nn.Reshape((4, -1)).apply({}, jnp.ones((2, 6)))
