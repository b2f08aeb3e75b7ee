"""The backward transform: value_and_grad, grad, vjp, to_jax, user layers; jit, vmap and scan."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn

MODEL = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(16), nn.ReLU(), nn.Dense(4))
LOSS = losses.CategoricalCrossEntropy(from_logits=True)


def _data(n=12, key=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    x = jax.random.normal(k1, (n, 5))
    y = jax.random.randint(k2, (n,), 0, 4)
    return MODEL.init(k3, x), x, y


def _jax_value_and_grad(params, x, y):
    return jax.value_and_grad(lambda p: LOSS(MODEL.apply(p, x), y))(params)


@pytest.mark.every_mode  # all four precision × jit combinations (conftest)
def test_value_and_grad_equals_jax(dtype, jit):
    params, x, y = jax.tree_util.tree_map(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a, _data())
    f = fbp.value_and_grad(MODEL, LOSS)
    value, grads = (jax.jit(f) if jit else f)(params, x, y)
    ref_value, ref_grads = _jax_value_and_grad(params, x, y)
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(value, ref_value, rtol=tol)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(jnp.abs(r).max()))


def test_grad_is_second_output():
    params, x, y = _data()
    jax.tree_util.tree_map(np.testing.assert_array_equal, fbp.grad(MODEL, LOSS)(params, x, y),
                           fbp.value_and_grad(MODEL, LOSS)(params, x, y)[1])


def test_per_example_gradients_with_vmap_equal_a_loop():
    params, x, y = _data(n=6)
    per_example = jax.jit(jax.vmap(fbp.grad(MODEL, LOSS), in_axes=(None, 0, 0)))(params, x[:, None], y[:, None])
    for i in range(6):
        single = fbp.grad(MODEL, LOSS)(params, x[i:i + 1], y[i:i + 1])
        for a, b in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(single)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-7)
    # and the mean of per-example gradients is the batch gradient
    batch = fbp.grad(MODEL, LOSS)(params, x, y)
    for a, b in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(batch)):
        np.testing.assert_allclose(a.mean(0), b, rtol=1e-5, atol=1e-7)


def test_training_inside_lax_scan_matches_python_loop():
    params, x, y = _data()
    vg = fbp.value_and_grad(MODEL, LOSS)

    def step(p, _):
        value, g = vg(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), value

    scanned, values = jax.jit(lambda p: jax.lax.scan(step, p, None, length=20))(params)
    looped = params
    for _ in range(20):
        looped, _ = step(looped, None)
    assert float(values[-1]) < float(values[0])
    for a, b in zip(jax.tree_util.tree_leaves(scanned), jax.tree_util.tree_leaves(looped)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_vjp_pullback_matches_jax():
    params, x, _ = _data()
    y, pullback = fbp.vjp(MODEL, params, x)
    d_y = jax.random.normal(jax.random.PRNGKey(9), y.shape)
    d_params, d_x = pullback(d_y)
    ref_y, ref_pullback = jax.vjp(MODEL.apply, params, x)
    ref_params, ref_x = ref_pullback(d_y)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6)
    np.testing.assert_allclose(d_x, ref_x, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(d_params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_to_jax_hands_fbp_rules_to_jax_grad():
    """A replaced backward (here: gradients scaled by 3) is what jax.grad sees through to_jax."""
    params, x, y = _data()
    f = fbp.to_jax(MODEL)
    g_fbp = jax.grad(lambda p: LOSS(f(p, x), y))(params)
    g_ref = _jax_value_and_grad(params, x, y)[1]
    for a, b in zip(jax.tree_util.tree_leaves(g_fbp), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    tripled = fbp.layer(nn.Identity().forward, lambda res, d_y: ({}, 3 * d_y), name="Tripled")
    g3 = jax.grad(lambda v: fbp.to_jax(tripled)({}, v).sum())(x)
    np.testing.assert_array_equal(g3, 3 * jnp.ones_like(x))


# --------------------------------------------------------------------------- a user's own layer
def _scale_init(key, x):
    return {"scale": jnp.ones(x.shape[-1], x.dtype)}


def _scale_forward(params, x):
    """y = x * scale * sin(x)."""
    s = jnp.sin(x)
    return x * params["scale"] * s, (x, s, params["scale"])


def _scale_backward(res, d_y):
    x, s, scale = res
    d_scale = (d_y * x * s).reshape(-1, x.shape[-1]).sum(0)
    d_x = d_y * scale * (s + x * jnp.cos(x))
    return {"scale": d_scale}, d_x


USER = fbp.layer(_scale_forward, _scale_backward, _scale_init, name="ScaledSine")


def test_user_layer_composes_checks_and_jits(dtype):
    model = nn.Serial(nn.Dense(6), USER, nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5), dtype)
    y = jax.random.randint(jax.random.PRNGKey(1), (4,), 0, 3)
    params = model.init(jax.random.PRNGKey(2), x)
    assert params[1]["scale"].shape == (6,)
    fbp.check.assert_layer(USER, {"scale": jnp.linspace(0.5, 2, 5)}, x, dtype=dtype)
    fbp.check.assert_model(model, LOSS, params, x, y, dtype=dtype, jit=True)
    value, grads = jax.jit(fbp.value_and_grad(model, LOSS))(params, x, y)
    assert jnp.isfinite(value) and grads[1]["scale"].shape == (6,)
    assert repr(USER) == "ScaledSine()"


def test_subclassing_layer_is_the_other_way():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Square(fbp.Layer):
        def init(self, key, x):
            return {}

        def forward(self, params, x):
            return x * x, x

        def backward(self, x, d_y):
            return {}, 2 * x * d_y

    fbp.check.assert_layer(Square(), {}, jnp.arange(1.0, 5.0))
    assert hash(Square()) == hash(Square())  # static, jit-friendly


def test_no_autodiff_inside_the_package_outside_the_checker():
    names = "grad|vjp|jvp|value_and_grad|linearize|jacfwd|jacrev|hessian"
    pattern = re.compile(rf"\bjax\.({names})\b|from jax import[^#\n]*\b({names})\b")
    package = pathlib.Path(fbp.__file__).parent
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "check.py" and pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key])
def test_both_key_kinds_initialise(make_key):
    params = MODEL.init(make_key(0), jnp.ones((2, 5)))
    assert params[0]["w"].shape == (5, 16)
