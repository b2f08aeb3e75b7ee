"""Dense: backward vs jax, leading axes, init, and errors that name the layer, path and shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fbp
from fbp import nn


@pytest.mark.every_mode  # all four precision × jit combinations (conftest)
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_jax(use_bias, dtype, jit):
    layer = nn.Dense(6, use_bias=use_bias)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x, dtype=dtype, jit=jit)


@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), n_in=st.integers(1, 7), n_out=st.integers(1, 7),
       seed=st.integers(0, 1000))
def test_random_shapes_and_leading_axes(lead, n_in, n_out, seed):
    layer = nn.Dense(n_out)
    x = jax.random.normal(jax.random.PRNGKey(seed), (*lead, n_in))
    params = layer.init(jax.random.PRNGKey(seed + 1), x)
    params = {"w": params["w"], "b": jax.random.normal(jax.random.PRNGKey(seed + 2), (n_out,))}
    fbp.check.assert_layer(layer, params, x, jit=True)


def test_init_shapes_dtypes_and_key_kinds():
    x = jnp.ones((3, 5))
    for key in (jax.random.PRNGKey(0), jax.random.key(0)):
        p = nn.Dense(4).init(key, x)
        assert p["w"].shape == (5, 4) and p["b"].shape == (4,) and p["w"].dtype == jnp.float32
        np.testing.assert_array_equal(p["b"], 0)
    p = nn.Dense(4, use_bias=False).init(jax.random.PRNGKey(0), jax.ShapeDtypeStruct((3, 5), jnp.float32))
    assert set(p) == {"w"}


def test_default_kernel_is_glorot_uniform():
    w = nn.Dense(300).init(jax.random.PRNGKey(0), jnp.ones((1, 200)))["w"]
    limit = np.sqrt(6 / (200 + 300))
    assert float(jnp.abs(w).max()) <= limit
    np.testing.assert_allclose(float(w.var()), limit**2 / 3, rtol=0.05)


def test_weight_gradient_is_x_transpose_d_y():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    d_y = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
    layer = nn.Dense(5)
    params = layer.init(jax.random.PRNGKey(2), x)
    d_params, d_x = layer.backward(layer.forward(params, x)[1], d_y)
    np.testing.assert_allclose(d_params["w"], np.einsum("abi,abo->io", x, d_y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_params["b"], d_y.sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(d_x, d_y @ params["w"].T, rtol=1e-5)


def test_wrong_input_width_names_layer_path_and_shapes():
    model = nn.Serial(nn.Dense(8), nn.ReLU(), nn.Dense(3))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    with pytest.raises(fbp.InputError) as info:
        model.apply(params, jnp.ones((2, 5)))
    message = str(info.value)
    assert "Dense(features=8) at path '0'" in message and "'0/w'" in message
    assert "(4, 8)" in message and "(5, 8)" in message and "(2, 5) float32" in message


def test_integer_input_is_rejected_with_a_fix():
    layer = nn.Dense(3)
    with pytest.raises(fbp.InputError, match=r"Dense\(features=3\).*floating-point.*\(2, 4\) int32.*astype"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((2, 4), jnp.int32))


def test_params_with_missing_or_misshapen_entries():
    layer = nn.Dense(3)
    x = jnp.ones((2, 4))
    with pytest.raises(fbp.InputError, match=r"keys \['b', 'w'\], received \['w'\]"):
        layer.apply({"w": jnp.ones((4, 3))}, x)
    with pytest.raises(fbp.InputError, match=r"parameter 'b' expected shape \(3,\).*received \(4,\) float32"):
        layer.apply({"w": jnp.ones((4, 3)), "b": jnp.ones(4)}, x)


def test_invalid_features():
    with pytest.raises(ValueError, match="features must be a positive int"):
        nn.Dense(0)
