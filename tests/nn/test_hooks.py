"""Cotangent hooks: identity forward, the backward of their equation (NumPy), fbp.check, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import check, losses, nn
from fbp.core import InputError

HOOKS = [(nn.ScaleGradient(0.25), lambda g: 0.25 * g), (nn.GradientReversal(1.5), lambda g: -1.5 * g),
         (nn.StopGradient(), lambda g: 0 * g), (nn.MapCotangent(lambda g: jnp.clip(g, -0.5, 0.5), name="clip"),
                                                lambda g: np.clip(g, -0.5, 0.5))]


@pytest.mark.parametrize("hook, equation", HOOKS, ids=lambda v: repr(v) if isinstance(v, nn.Layer) else "")
def test_hook_is_its_equation(hook, equation, dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3), dtype)
    d_y = 2 * jax.random.normal(jax.random.PRNGKey(1), (4, 3), dtype)
    y, res = hook.forward({}, x)
    backward = jax.jit(hook.backward) if jit else hook.backward
    d_params, d_x = backward(res, d_y)
    np.testing.assert_array_equal(y, x)
    assert d_params == {} and d_x.dtype == dtype
    np.testing.assert_allclose(d_x, equation(np.asarray(d_y)), rtol=1e-6)
    report = check.layer(hook, {}, x, dtype=dtype)
    assert report.ok and report.notes, str(report)


def test_check_catches_a_wrong_hook():
    @dataclasses.dataclass(frozen=True)
    class WrongReversal(nn.GradientReversal):
        def _backward(self, res, d_y):
            return -1.01 * self.scale * d_y

    assert not check.layer(WrongReversal(1.0), {}, jnp.ones((3, 2))).ok


def test_gradient_reversal_in_a_model_reverses_everything_below():
    with jax.enable_x64(True):
        body = nn.Serial(nn.Dense(6), nn.Tanh())
        model = nn.Serial(body, nn.GradientReversal(0.5), nn.Dense(2))
        x, y = jax.random.normal(jax.random.PRNGKey(0), (5, 4)), jnp.arange(5) % 2
        params = model.init(jax.random.PRNGKey(1), x)
        loss = losses.CategoricalCrossEntropy(from_logits=True)
        _, grads = fbp.value_and_grad(model, loss)(params, x, y)
        plain = jax.grad(lambda p: loss(model.apply(p, x), y))(params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, -0.5 * b, rtol=1e-12), grads[0], plain[0])
        np.testing.assert_allclose(grads[2]["w"], plain[2]["w"], rtol=1e-12)
        report = check.model(model, loss, params, x, y)
        assert report.ok and any("path '1'" in note for note in report.notes)


def test_map_cotangent_that_changes_the_shape_names_the_path():
    model = nn.Serial(nn.Dense(3), nn.MapCotangent(lambda g: g.sum(axis=0), name="sum"), nn.Dense(2))
    x = jnp.ones((4, 5))
    with pytest.raises(InputError, match=r"at path '1'.*\(4, 3\) float32 it returns \(3,\) float32"):
        model.init(jax.random.PRNGKey(0), x)  # fn is traced on the output's shape: before anything runs
    params = nn.Serial(nn.Dense(3), nn.Identity(), nn.Dense(2)).init(jax.random.PRNGKey(0), x)
    with pytest.raises(InputError, match=r"at path '1'"):
        fbp.value_and_grad(model, losses.MSE())(params, x, jnp.ones((4, 2)))
    bad_dtype = nn.MapCotangent(lambda g: g.astype(jnp.float16))
    with pytest.raises(InputError, match="float16"):
        bad_dtype.forward({}, x)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="scale"):
        nn.GradientReversal(-1.0)
    with pytest.raises(ValueError, match="factor"):
        nn.ScaleGradient(float("nan"))
    with pytest.raises(TypeError, match="callable"):
        nn.MapCotangent(3)
