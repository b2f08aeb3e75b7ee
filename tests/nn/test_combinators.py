"""Serial: backprop through children in reverse, nested paths in errors, keys split per layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn


@pytest.mark.every_mode  # all four precision × jit combinations (conftest)
def test_mlp_matches_jax(dtype, jit):
    model = nn.Serial(nn.Dense(7), nn.Tanh(), nn.Dense(5), nn.ReLU(), nn.Dense(2), nn.Softmax())
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    fbp.check.assert_layer(model, model.init(jax.random.PRNGKey(1), x), x, dtype=dtype, jit=jit)


def test_nested_serial_and_paths():
    inner = nn.Serial(nn.Dense(4), nn.Sigmoid())
    model = nn.Serial(inner, nn.Dense(2))
    x = jnp.ones((3, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    assert params[0][0]["w"].shape == (5, 4) and params[1]["w"].shape == (4, 2)
    report = fbp.check.layer(model, params, x)
    assert report.ok and {"0/0/w", "0/0/b", "1/w", "1/b", "x"} <= {row.path for row in report.rows}
    bad = (params[0], {"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
    with pytest.raises(fbp.InputError, match=r"at path '1': parameter '1/w' expected shape \(4, 2\)"):
        model.apply(bad, x)
    bad = ((params[0][0], {"w": jnp.ones(1)}), params[1])
    with pytest.raises(fbp.InputError, match=r"Sigmoid\(\) at path '0/1'"):
        model.apply(bad, x)


def test_children_get_different_keys():
    model = nn.Serial(nn.Dense(4), nn.Dense(4))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    assert not np.allclose(params[0]["w"], params[1]["w"])


def test_params_that_do_not_fit_the_model():
    model = nn.Serial(nn.Dense(4), nn.ReLU(), nn.Dense(2))
    other = nn.Serial(nn.Dense(4), nn.Dense(2)).init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    with pytest.raises(fbp.InputError, match=r"Serial at path '<root>'.*3 entries.*tuple of 2 entries"):
        model.apply(other, jnp.ones((1, 3)))
    with pytest.raises(fbp.InputError, match="received a dict"):
        model.apply({"w": 1}, jnp.ones((1, 3)))


def test_non_layer_argument():
    with pytest.raises(TypeError, match="argument 1 must be an fbp Layer"):
        nn.Serial(nn.Dense(2), jnp.tanh)


def test_init_errors_carry_the_path():
    with pytest.raises(fbp.InputError, match=r"Dense\(features=2\) at path '1'.*at least one axis"):
        nn.Serial(nn.Identity(), nn.Dense(2)).init(jax.random.PRNGKey(0), jnp.ones(()))


def test_residual_and_parallel_match_jax(dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6), dtype)
    for layer in (nn.Residual(nn.Serial(nn.Dense(6), nn.Tanh())), nn.Residual(nn.Dense(3), projection=nn.Dense(3)),
                  nn.Parallel(nn.Dense(2), nn.Tanh(), nn.Serial(nn.Dense(3), nn.ReLU()))):
        fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x, dtype=dtype, jit=jit)


def test_residual_passes_the_gradient_through_the_identity():
    block = nn.Dense(4, kernel_init=nn.init.zeros)
    layer = nn.Residual(block)
    x = jnp.ones((2, 4))
    _, d_x = layer.backward(layer.forward(layer.init(jax.random.PRNGKey(0), x), x)[1], jnp.ones((2, 4)))
    np.testing.assert_array_equal(d_x, 1.0)  # a zero block still passes d_y unchanged


def test_residual_shape_mismatch_suggests_projection():
    layer = nn.Residual(nn.Dense(3))
    with pytest.raises(fbp.InputError, match="add a projection"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((2, 4))) and layer.apply(
            layer.init(jax.random.PRNGKey(0), jnp.ones((2, 4))), jnp.ones((2, 4)))


def test_stateful_random_model_end_to_end():
    model = nn.Serial(nn.Conv2D(4, 3), nn.BatchNorm(), nn.ReLU(), nn.Dropout(0.25),
                      nn.Residual(nn.Serial(nn.Conv2D(4, 3), nn.BatchNorm())), nn.GlobalAvgPool(), nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 2))
    y = jnp.array([0, 1, 2, 0, 1, 2])
    params = model.init(jax.random.PRNGKey(1), x)
    state = model.init_state(params)
    assert model.has_state and model.needs_key
    np.testing.assert_array_equal(state[1]["mean"], jnp.zeros(4))
    np.testing.assert_array_equal(state[1]["var"], jnp.ones(4))
    loss = fbp.losses.CategoricalCrossEntropy(from_logits=True)
    fbp.check.assert_model(model, loss, params, x, y, state=state, key=jax.random.PRNGKey(2))
    value, grads, new_state = jax.jit(fbp.value_and_grad(model, loss, has_state=True))(
        params, state, x, y, key=jax.random.PRNGKey(2))
    assert not np.allclose(new_state[1]["mean"], state[1]["mean"])
    assert new_state[4]["block"][1]["var"].shape == (4,)
    # a stateless deterministic model still needs nothing
    plain = nn.Serial(nn.Dense(3))
    assert not plain.has_state and not plain.needs_key
