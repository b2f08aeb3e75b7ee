"""Normalisation vs jax.grad; BatchNorm train vs eval and its running averages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn


def _params(layer, x, key=3):
    p = layer.init(jax.random.PRNGKey(0), x)
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    return {"scale": 1 + 0.3 * jax.random.normal(k1, p["scale"].shape, x.dtype),
            "b": jax.random.normal(k2, p["b"].shape, x.dtype)}


@pytest.mark.parametrize("layer, shape", [(nn.LayerNorm(), (4, 7)), (nn.LayerNorm(), (2, 3, 5)),
                                          (nn.GroupNorm(3), (2, 4, 4, 6)), (nn.GroupNorm(1), (3, 5, 4)),
                                          (nn.GroupNorm(4), (2, 3, 4))])
def test_layer_and_group_norm_match_jax(layer, shape, dtype, jit):
    x = 2 + 3 * jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
    fbp.check.assert_layer(layer, _params(layer, x), x, dtype=dtype, jit=jit)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 6)])
def test_batch_norm_matches_jax(shape, train, dtype, jit):
    layer = nn.BatchNorm()
    x = 2 + 3 * jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
    state = {"mean": jnp.full(shape[-1], 0.5, dtype), "var": jnp.full(shape[-1], 2.0, dtype)}
    fbp.check.assert_layer(layer, _params(layer, x), x, state=state, train=train, dtype=dtype, jit=jit)


def test_batch_norm_train_normalises_and_updates_running_averages():
    layer = nn.BatchNorm(momentum=0.9)
    x = 5 + 2 * jax.random.normal(jax.random.PRNGKey(0), (256, 3))
    params = layer.init(jax.random.PRNGKey(1), x)
    state = layer.init_state(params)
    y, res = layer.forward(params, x, state=state, train=True)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(0), 1, rtol=1e-3)
    new = layer.next_state(state, res)
    np.testing.assert_allclose(new["mean"], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * x.var(0), rtol=1e-5)
    for _ in range(200):
        new = layer.next_state(new, res)
    y_eval, res_eval = layer.forward(params, x, state=new, train=False)
    np.testing.assert_allclose(y_eval, y, atol=1e-3)  # converged running stats ≈ batch stats
    assert layer.next_state(new, res_eval) is new  # evaluation leaves the state alone


def test_batch_norm_needs_state_in_evaluation():
    layer = nn.BatchNorm()
    x = jnp.ones((4, 3))
    with pytest.raises(fbp.InputError, match="evaluation mode .* needs the running statistics"):
        layer.apply(layer.init(jax.random.PRNGKey(0), x), x)


def test_errors():
    with pytest.raises(fbp.InputError, match=r"channels \(6\) must be divisible by num_groups \(4\)"):
        nn.GroupNorm(4).apply({"scale": jnp.ones(6), "b": jnp.zeros(6)}, jnp.ones((2, 3, 6)))
    with pytest.raises(fbp.InputError, match=r"parameter 'scale' expected shape \(3,\)"):
        nn.LayerNorm().apply({"scale": jnp.ones(4), "b": jnp.zeros(3)}, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="momentum must be in"):
        nn.BatchNorm(momentum=1.5)
