"""Embedding: table gradient vs jax.grad (repeated ids add up); integer ids required."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn


@pytest.mark.every_mode  # all four precision × jit combinations (conftest)
def test_matches_jax(dtype, jit):
    layer = nn.Embedding(7, 3, dtype=jnp.dtype(dtype).name)
    ids = jnp.array([[1, 2, 2], [6, 0, 1]])
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(0), ids), ids, dtype=dtype, jit=jit)


def test_repeated_ids_accumulate():
    layer = nn.Embedding(4, 2)
    ids = jnp.array([1, 1, 3])
    params = layer.init(jax.random.PRNGKey(0), ids)
    d_params, d_x = layer.backward(layer.forward(params, ids)[1], jnp.ones((3, 2)))
    np.testing.assert_array_equal(d_params["table"], [[0, 0], [2, 2], [0, 0], [1, 1]])
    assert d_x is None


def test_float_ids_are_rejected():
    with pytest.raises(fbp.InputError, match=r"integer ids in \[0, 4\), received \(3,\) float32"):
        nn.Embedding(4, 2).init(jax.random.PRNGKey(0), jnp.ones(3))
