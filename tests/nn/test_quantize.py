"""Straight-through quantisers: forward and backward against NumPy from their equations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import check, losses, nn
from fbp.core import InputError


def _x(dtype):  # away from the kinks |x| = 1 and the rounding midpoints
    x = jnp.asarray([[-2.3, -1.2, -0.7, -0.2, 0.0], [0.3, 0.8, 1.3, 2.6, -0.05]], dtype)
    return x, jnp.asarray(np.random.default_rng(0).normal(size=x.shape), dtype)


@pytest.mark.parametrize("layer", [nn.Sign(), nn.Sign(ste="identity"), nn.Round(), nn.Round(ste="hardtanh")],
                         ids=repr)
def test_quantiser_is_its_equation(layer, dtype, jit):
    x, d_y = _x(dtype)
    xn, gn = np.asarray(x), np.asarray(d_y)
    y, res = (jax.jit(layer.forward) if jit else layer.forward)({}, x)
    expected_y = np.where(xn >= 0, 1.0, -1.0) if isinstance(layer, nn.Sign) else np.round(xn)
    np.testing.assert_array_equal(y, expected_y)
    d_x = layer.backward(res, d_y)[1]
    expected = gn if layer.ste == "identity" else gn * (np.abs(xn) <= 1)
    np.testing.assert_array_equal(d_x, expected.astype(xn.dtype))
    assert check.layer(layer, {}, x, d_y=d_y, dtype=dtype).ok


def test_binary_weight_dense_passes_the_kernel_gradient_straight_through():
    with jax.enable_x64(True):
        layer = nn.QuantizeWeights(nn.Dense(3), nn.Sign(ste="identity"))
        x = jax.random.normal(jax.random.PRNGKey(0), (4, 5))
        params = layer.init(jax.random.PRNGKey(1), x)
        y, res = layer.forward(params, x)
        sign_w = np.where(np.asarray(params["w"]) >= 0, 1.0, -1.0)
        np.testing.assert_allclose(y, np.asarray(x) @ sign_w + np.asarray(params["b"]), rtol=1e-12)
        d_y = jnp.ones((4, 3))
        d_params, d_x = layer.backward(res, d_y)
        np.testing.assert_allclose(d_params["w"], np.asarray(x).T @ np.ones((4, 3)), rtol=1e-12)  # STE: identity
        np.testing.assert_allclose(d_x, np.ones((4, 3)) @ sign_w.T, rtol=1e-12)
        assert check.layer(layer, params, x).ok
        model = nn.Serial(nn.QuantizeWeights(nn.Dense(6)), nn.Sign(), nn.Dense(2))
        p = model.init(jax.random.PRNGKey(2), x)
        report = check.model(model, losses.MSE(), p, x, jnp.zeros((4, 2)))
        assert report.ok and len([n for n in report.notes if "by design" in n]) == 2


def test_check_catches_a_wrong_estimator():
    @dataclasses.dataclass(frozen=True)
    class Leaky(nn.Sign):
        def _backward(self, x, d_y):
            return jnp.where(jnp.abs(x) <= 1, d_y, 0.01 * d_y)

    x, _ = _x(jnp.float32)
    assert not check.layer(Leaky(), {}, x).ok


def test_bad_input():
    with pytest.raises(ValueError, match="ste must be one of"):
        nn.Sign(ste="tanh")
    with pytest.raises(TypeError, match="quantizer"):
        nn.QuantizeWeights(nn.Dense(2), nn.ReLU())
    layer = nn.QuantizeWeights(nn.Dense(2), keys=("kernel",))
    x = jnp.ones((3, 4))
    model = nn.Serial(nn.Dense(4), layer)
    with pytest.raises(InputError, match=r"at path '1'.*no parameter \['kernel'\]"):
        fbp.value_and_grad(model, losses.MSE())(model.init(jax.random.PRNGKey(0), x), x, jnp.ones((3, 2)))
