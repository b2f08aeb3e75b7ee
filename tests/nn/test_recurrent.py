"""SimpleRNN, LSTM, GRU: BPTT vs jax.grad (f64/f32, jit/eager, T = 1, initial states, stacks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn

CELLS = [nn.SimpleRNN(5), nn.LSTM(4), nn.GRU(3)]


def _perturbed(params, scale=0.2):
    return jax.tree_util.tree_map(lambda a: a + scale * jax.random.normal(jax.random.PRNGKey(7), a.shape, a.dtype),
                                  params)


@pytest.mark.parametrize("layer", CELLS, ids=repr)
@pytest.mark.parametrize("length", [1, 2, 7])
def test_matches_jax(layer, length, dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, length, 4), dtype)
    fbp.check.assert_layer(layer, _perturbed(layer.init(jax.random.PRNGKey(1), x)), x, dtype=dtype, jit=jit)


@pytest.mark.parametrize("layer", CELLS, ids=repr)
def test_initial_state_and_its_cotangent(layer, dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3), dtype)
    h0 = 0.5 * jax.random.normal(jax.random.PRNGKey(1), (2, layer.hidden), dtype)
    inputs = (x, (h0, -h0)) if isinstance(layer, nn.LSTM) else (x, h0)
    report = fbp.check.assert_layer(layer, _perturbed(layer.init(jax.random.PRNGKey(2), inputs)), inputs, dtype=dtype)
    assert {"x/0", "x/1"} <= {row.path for row in report.rows}


def test_stacked_recurrent_model():
    model = nn.Serial(nn.LSTM(6), nn.GRU(5), nn.SimpleRNN(4), nn.LastStep(), nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 2))
    y = jnp.array([0, 1, 2, 1])
    fbp.check.assert_model(model, losses.CategoricalCrossEntropy(from_logits=True),
                           model.init(jax.random.PRNGKey(1), x), x, y, jit=True)


def test_long_lstm_has_finite_gradients():
    model = nn.Serial(nn.LSTM(32), nn.LastStep(), nn.Dense(2))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 200, 4))
    y = jnp.zeros(8, jnp.int32)
    grads = jax.jit(fbp.grad(model, losses.CategoricalCrossEntropy(from_logits=True)))(
        model.init(jax.random.PRNGKey(1), x), x, y)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_lstm_forget_bias_starts_at_one_and_gates_are_pytorch_ordered():
    p = nn.LSTM(3).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2)))
    np.testing.assert_array_equal(p["b"], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert p["w_x"].shape == (2, 12) and p["w_h"].shape == (3, 12)


def test_recurrent_kernel_is_orthogonal():
    w = nn.LSTM(8).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2)))["w_h"][:, :8]
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)


def test_errors():
    with pytest.raises(fbp.InputError, match=r"\(batch, time, features\), received \(4, 3\) float32"):
        nn.GRU(3).init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
    with pytest.raises(fbp.InputError, match=r"initial state must be \(2, 3\), received \(2, 4\)"):
        layer = nn.SimpleRNN(3)
        x = jnp.ones((2, 5, 1))
        layer.apply(layer.init(jax.random.PRNGKey(0), x), (x, jnp.ones((2, 4))))
    with pytest.raises(fbp.InputError, match=r"pair \(h0, c0\)"):
        nn.LSTM(3).init(jax.random.PRNGKey(0), (jnp.ones((2, 5, 1)), jnp.ones((2, 3))))
