"""Every activation's backward vs jax.grad (float64 and float32, jit and eager, random shapes, kinks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fbp
from fbp import nn

ACTIVATIONS = [nn.Identity(), nn.Sigmoid(), nn.Tanh(), nn.ReLU(), nn.LeakyReLU(), nn.LeakyReLU(negative_slope=0.2),
               nn.ELU(), nn.ELU(alpha=0.5), nn.GELU(), nn.GELU(approximate=False), nn.Softplus(), nn.SiLU(),
               nn.Softmax(), nn.Softmax(axis=1), nn.LogSoftmax(), nn.LogSoftmax(axis=0)]
IDS = [repr(a) for a in ACTIVATIONS]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=IDS)
def test_matches_jax(act, dtype, jit):
    x = 3 * jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
    fbp.check.assert_layer(act, {}, x, dtype=dtype, jit=jit)


@settings(max_examples=24)
@given(act=st.sampled_from(ACTIVATIONS), shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       seed=st.integers(0, 2**16))
def test_random_shapes(act, shape, seed):
    x = 2 * jax.random.normal(jax.random.PRNGKey(seed), tuple(shape))
    fbp.check.assert_layer(act, {}, x, seed=seed + 1, jit=True)


def _jax_grad_of_forward(act, x, d_y):
    return jax.vjp(lambda v: act.apply({}, v), x)[1](d_y)[0]


@pytest.mark.parametrize("act, expected_slope_at_zero", [
    (nn.ReLU(), 0.0), (nn.LeakyReLU(negative_slope=0.1), 1.0), (nn.ELU(alpha=0.7), 0.7)])
def test_kink_at_zero_follows_jax(act, expected_slope_at_zero, dtype):
    x = jnp.array([[-1.0, 0.0, 0.0, 2.0], [0.0, 3.0, -2.0, 0.0]], dtype)  # integer-valued: exact ties at 0
    d_y = jnp.arange(1.0, 9.0, dtype=dtype).reshape(2, 4)
    _, d_x = act.backward(act.forward({}, x)[1], d_y)
    reference = _jax_grad_of_forward(act, x, d_y)
    at_zero = x == 0
    np.testing.assert_array_equal(d_x[at_zero], reference[at_zero])  # the kink: exactly jax's convention
    np.testing.assert_allclose(d_x, reference, rtol=1e-6)
    np.testing.assert_allclose(d_x[at_zero], expected_slope_at_zero * d_y[at_zero], rtol=1e-6)


def test_relu_matches_jax_nn_relu_convention():
    x = jnp.array([-1.0, 0.0, 1.0])
    _, d_x = nn.ReLU().backward(nn.ReLU().forward({}, x)[1], jnp.ones(3))
    np.testing.assert_array_equal(d_x, jax.grad(lambda v: jax.nn.relu(v).sum())(x))


def test_softmax_rows_sum_to_one_and_logsoftmax_is_stable():
    x = jnp.array([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]])
    y = nn.Softmax().apply({}, x)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    assert jnp.isfinite(nn.LogSoftmax().apply({}, x)).all()
    np.testing.assert_allclose(nn.LogSoftmax().apply({}, x), jax.nn.log_softmax(x), rtol=1e-6)


@pytest.mark.parametrize("act, ref", [(nn.Sigmoid(), jax.nn.sigmoid), (nn.Tanh(), jnp.tanh),
                                      (nn.GELU(), jax.nn.gelu), (nn.GELU(approximate=False),
                                                                 lambda v: jax.nn.gelu(v, approximate=False)),
                                      (nn.ELU(), jax.nn.elu), (nn.SiLU(), jax.nn.silu),
                                      (nn.Softplus(), jax.nn.softplus), (nn.LeakyReLU(), jax.nn.leaky_relu)])
def test_forward_matches_jax_nn(act, ref):
    x = jnp.linspace(-5, 5, 41)
    np.testing.assert_allclose(act.apply({}, x), ref(x), rtol=1e-6, atol=1e-7)


def test_integer_input_is_rejected():
    with pytest.raises(fbp.InputError, match=r"Tanh\(\).*floating-point.*\(3,\) int32"):
        nn.Tanh().apply({}, jnp.arange(3))


def test_params_given_to_parameter_free_layer_are_rejected():
    with pytest.raises(fbp.InputError, match="has no parameters"):
        nn.ReLU().apply({"w": jnp.ones(2)}, jnp.ones(2))
