"""Each optimizer equals a NumPy implementation of its published update, written here, over
25 steps in float64, for several hyperparameter settings; and each converges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import optim

STEPS = 25


def _grads(step, shape=(3, 4)):
    rng = np.random.default_rng(step)
    return {"w": rng.normal(size=shape), "b": rng.normal(size=shape[-1:]) * 0.1}


def _params0():
    rng = np.random.default_rng(1234)
    return {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}


# --------------------------------------------------------------------------- NumPy references
def np_sgd(lr, momentum=None, nesterov=False):
    def run(params):
        m = {k: np.zeros_like(v) for k, v in params.items()}
        for t in range(STEPS):
            g = _grads(t)
            for k in params:
                if momentum is None:
                    step = g[k]
                else:
                    m[k] = momentum * m[k] + g[k]
                    step = g[k] + momentum * m[k] if nesterov else m[k]
                params[k] = params[k] - lr * step
        return params
    return run


def np_adagrad(lr, initial_accumulator_value=0.1, eps=1e-7):
    def run(params):
        s = {k: np.full_like(v, initial_accumulator_value) for k, v in params.items()}
        for t in range(STEPS):
            g = _grads(t)
            for k in params:
                s[k] = s[k] + g[k] ** 2
                params[k] = params[k] - lr * g[k] / np.sqrt(s[k] + eps)
        return params
    return run


def np_rmsprop(lr, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True, centered=False, momentum=None,
               nesterov=False, bias_correction=False):
    def run(params):
        nu = {k: np.full_like(v, initial_scale) for k, v in params.items()}
        mu = {k: np.zeros_like(v) for k, v in params.items()}
        mom = {k: np.zeros_like(v) for k, v in params.items()}
        for t in range(1, STEPS + 1):
            g = _grads(t - 1)
            for k in params:
                nu[k] = decay * nu[k] + (1 - decay) * g[k] ** 2
                mu[k] = decay * mu[k] + (1 - decay) * g[k]
                corr = (1 - decay**t) if bias_correction else 1.0
                denom_sq = nu[k] / corr - ((mu[k] / corr) ** 2 if centered else 0.0)
                scaled = g[k] / np.sqrt(denom_sq + eps) if eps_in_sqrt else g[k] / (np.sqrt(denom_sq) + eps)
                step = lr * scaled
                if momentum is not None:
                    mom[k] = momentum * mom[k] + step
                    step = step + momentum * mom[k] if nesterov else mom[k]
                params[k] = params[k] - step
        return params
    return run


def np_adam(lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=None, nesterov=False):
    def run(params):
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(p) for k, p in params.items()}
        for t in range(1, STEPS + 1):
            g = _grads(t - 1)
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                if nesterov:
                    m_hat = b1 * m[k] / (1 - b1 ** (t + 1)) + (1 - b1) * g[k] / (1 - b1**t)
                else:
                    m_hat = m[k] / (1 - b1**t)
                v_hat = v[k] / (1 - b2**t)
                step = m_hat / (np.sqrt(v_hat + eps_root) + eps)
                if weight_decay is not None:
                    step = step + weight_decay * params[k]
                params[k] = params[k] - lr * step
        return params
    return run


CASES = [
    ("sgd", optim.sgd(0.1), np_sgd(0.1)),
    ("sgd momentum", optim.sgd(0.05, momentum=0.9), np_sgd(0.05, momentum=0.9)),
    ("sgd nesterov", optim.sgd(0.05, momentum=0.8, nesterov=True), np_sgd(0.05, momentum=0.8, nesterov=True)),
    ("adagrad", optim.adagrad(0.3), np_adagrad(0.3)),
    ("adagrad init 0", optim.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-3),
     np_adagrad(0.1, initial_accumulator_value=0.0, eps=1e-3)),
    ("rmsprop", optim.rmsprop(0.01), np_rmsprop(0.01)),
    ("rmsprop eps outside", optim.rmsprop(0.01, decay=0.95, eps=1e-3, eps_in_sqrt=False),
     np_rmsprop(0.01, decay=0.95, eps=1e-3, eps_in_sqrt=False)),
    ("rmsprop centered momentum", optim.rmsprop(0.01, centered=True, momentum=0.9, initial_scale=0.1),
     np_rmsprop(0.01, centered=True, momentum=0.9, initial_scale=0.1)),
    ("rmsprop nesterov bias-corrected", optim.rmsprop(0.02, momentum=0.5, nesterov=True, bias_correction=True),
     np_rmsprop(0.02, momentum=0.5, nesterov=True, bias_correction=True)),
    ("adam", optim.adam(1e-2), np_adam(1e-2)),
    ("adam b1 0.5 eps_root", optim.adam(3e-2, b1=0.5, b2=0.99, eps=1e-6, eps_root=1e-8),
     np_adam(3e-2, b1=0.5, b2=0.99, eps=1e-6, eps_root=1e-8)),
    ("nadam", optim.adam(1e-2, nesterov=True), np_adam(1e-2, nesterov=True)),
    ("adamw", optim.adamw(1e-2), np_adam(1e-2, weight_decay=1e-4)),
    ("adamw strong decay", optim.adamw(1e-2, weight_decay=0.1), np_adam(1e-2, weight_decay=0.1)),
]


def _run_fbp(tx, params, jit):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for t in range(STEPS):
        grads = jax.tree_util.tree_map(lambda g, p: jnp.asarray(g, p.dtype), _grads(t), params)
        updates, state = update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name, tx, reference", CASES, ids=[c[0] for c in CASES])
def test_matches_numpy_equations_float64(name, tx, reference):
    with jax.enable_x64(True):
        got = _run_fbp(tx, jax.tree_util.tree_map(jnp.asarray, _params0()), jit=True)
    want = reference(_params0())
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, tx, reference", CASES[::3], ids=[c[0] for c in CASES[::3]])
def test_jit_equals_eager(name, tx, reference):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), _params0())
    a, b = _run_fbp(tx, params, jit=True), _run_fbp(tx, params, jit=False)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, tx, reference", CASES, ids=[c[0] for c in CASES])
def test_state_is_a_named_pytree_and_second_update_does_not_recompile(name, tx, reference):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), _params0())
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    grads = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), _grads(0))
    params1, state = step(params, state, grads)
    params2, state = step(params1, state, grads)
    assert len(traces) == 1
    for leaf in jax.tree_util.tree_leaves(params2):
        assert jnp.isfinite(leaf).all()
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    counts = [s.count for s in jax.tree_util.tree_leaves(
        state, is_leaf=lambda s: hasattr(s, "_fields") and "count" in s._fields) if hasattr(s, "count")]
    assert counts and all(int(c) == 2 for c in counts)


def _minimise(tx, loss, x0, steps):
    grad = jax.grad(loss)  # the test's reference gradient, not part of fbp
    state = tx.init(x0)

    @jax.jit
    def step(carry, _):
        x, state = carry
        updates, state = tx.update(grad(x), state, x)
        return (optim.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(step, (x0, state), None, length=steps)
    return x


QUADRATIC = lambda x: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * x**2)
ROSENBROCK = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

CONVERGE = [
    ("sgd", optim.sgd(0.09), optim.sgd(1e-3), 20000),
    ("momentum", optim.sgd(0.02, momentum=0.9), optim.sgd(2e-4, momentum=0.9), 20000),
    ("nesterov", optim.sgd(0.02, momentum=0.9, nesterov=True), optim.sgd(2e-4, momentum=0.9, nesterov=True), 20000),
    ("adagrad", optim.adagrad(0.5), optim.adagrad(0.5), 20000),
    ("rmsprop", optim.rmsprop(0.01), optim.rmsprop(1e-3), 20000),
    ("adam", optim.adam(0.05), optim.adam(0.02), 20000),
    ("adamw", optim.adamw(0.05, weight_decay=0.0), optim.adamw(0.02, weight_decay=0.0), 20000),
]


@pytest.mark.parametrize("name, on_quadratic, on_rosenbrock, steps", CONVERGE, ids=[c[0] for c in CONVERGE])
def test_converges_on_quadratic_and_rosenbrock(name, on_quadratic, on_rosenbrock, steps):
    x = _minimise(on_quadratic, QUADRATIC, jnp.array([3.0, -2.0]), 2000)
    np.testing.assert_allclose(x, [0.0, 0.0], atol=2e-2)
    x = _minimise(on_rosenbrock, ROSENBROCK, jnp.array([-1.2, 1.0]), steps)
    np.testing.assert_allclose(x, [1.0, 1.0], atol=5e-2)


@pytest.mark.parametrize("make", [
    lambda: optim.sgd(-0.1), lambda: optim.sgd(0.1, momentum=1.5), lambda: optim.adam(1e-3, b1=1.0),
    lambda: optim.adam(1e-3, b1=-0.1), lambda: optim.adam(1e-3, b2=1.0), lambda: optim.adam(1e-3, eps=-1e-8),
    lambda: optim.rmsprop(1e-3, decay=1.1), lambda: optim.rmsprop(1e-3, decay=-0.1), lambda: optim.adagrad(-1.0),
    lambda: optim.adagrad(0.1, eps=-1.0), lambda: optim.adamw(1e-3, weight_decay=-1.0),
    lambda: optim.clip_by_global_norm(0.0), lambda: optim.clip(-1.0)])
def test_invalid_hyperparameters_raise_value_error(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_adamw_mask_limits_decay_to_kernels():
    params = {"w": jnp.ones(3), "b": jnp.ones(3)}
    tx = optim.adamw(0.1, weight_decay=0.5, mask=lambda p: {"w": True, "b": False})
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.05)
    np.testing.assert_allclose(updates["b"], 0.0)
