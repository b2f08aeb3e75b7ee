"""fbp.kfac: the preconditioner is the damped inverse of the exact curvature where K-FAC is
exact; moving averages, the inverse period, training, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import kfac, losses, nn, optim

CE = losses.CategoricalCrossEntropy(from_logits=True)


@pytest.mark.parametrize("loss", [CE, losses.MSE()], ids=repr)
def test_one_dense_layer_one_example_is_the_damped_exact_ggn_inverse(loss):
    with jax.enable_x64(True):
        model = nn.Dense(3)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((1, 4)))
        params = model.init(jax.random.key(1), x)
        y = jnp.array([1]) if loss is CE else jnp.asarray(rng.standard_normal((1, 3)))
        k = kfac.kfac(model, loss, optim.sgd(1.0), damping=0.1, mc_samples=None)
        state = k.init(params, x, y)
        _, grads, factors = jax.jit(k._factors_of)(params, x, y)
        nat = jax.jit(lambda g, s, f: k.precondition(g, k.observe(s, f)))(grads, state, factors)

        def apply(flat):
            return model.apply({"w": flat[:12].reshape(4, 3), "b": flat[12:]}, x)

        flat = jnp.concatenate([params["w"].ravel(), params["b"]])
        jac = jax.jacrev(apply)(flat).reshape(3, 15)
        hess = jax.hessian(lambda z: loss(z, y))(apply(flat)).reshape(3, 3)
        g = jax.grad(lambda f: loss(apply(f), y))(flat)
        expected = jnp.linalg.solve(jac.T @ hess @ jac + 0.1 * jnp.eye(15), g)
        got = jnp.concatenate([nat["w"].ravel(), nat["b"]])
        assert float(jnp.max(jnp.abs(got - expected))) <= 1e-10 * float(jnp.max(jnp.abs(expected)))


def _digits(n=256):
    from sklearn.datasets import load_digits

    d = load_digits()
    return jnp.asarray(d.data[:n] / 16.0, jnp.float32), jnp.asarray(d.target[:n])


MODEL = nn.Serial(nn.Dense(32), nn.Tanh(), nn.Dense(10))


def test_moving_averages_and_the_inverse_period():
    x, y = _digits(64)
    params = MODEL.init(jax.random.key(0), x)
    k = kfac.kfac(MODEL, CE, optim.sgd(0.05), decay=0.9, inverse_every=2, mc_samples=None, debias=False)
    state = k.init(params, x, y)
    factors_of, observe = jax.jit(k._factors_of), jax.jit(k.observe)  # one compilation each, not op by op
    f1 = factors_of(params, x[:32], y[:32])[2]
    f2 = factors_of(params, x[32:], y[32:])[2]
    s1 = observe(state, f1)
    s1 = s1._replace(count=s1.count + 1)
    s2 = observe(s1, f2)
    a1, a2, a_avg = (f["0"].blocks[0].A for f in (f1, f2, s2.factors))
    assert jnp.allclose(s1.factors["0"].blocks[0].A, a1)  # step 0 takes the batch's factors
    assert jnp.allclose(a_avg, 0.9 * a1 + 0.1 * a2, rtol=1e-6)
    # step 1 is not a multiple of inverse_every=2: the eigendecomposition is the step-0 one
    for old, new in zip(jax.tree_util.tree_leaves(s1.eigen), jax.tree_util.tree_leaves(s2.eigen)):
        assert jnp.array_equal(old, new)
    s3 = observe(s2._replace(count=s2.count + 1), f2)
    qa, la, _, _ = s3.eigen["0"][0]
    assert jnp.allclose(qa @ jnp.diag(la) @ qa.T, s3.factors["0"].blocks[0].A, atol=1e-5)
    # bias-corrected (the default): Σ_i 0.9^{t-i} F_i / Σ_i 0.9^{t-i} after every observation
    debiased = kfac.kfac(MODEL, CE, optim.sgd(0.05), decay=0.9, inverse_every=2, mc_samples=None)
    d_observe = jax.jit(debiased.observe)
    d1 = d_observe(debiased.init(params, x, y), f1)
    d2 = d_observe(d1._replace(count=d1.count + 1), f2)
    d3 = d_observe(d2._replace(count=d2.count + 1), f1)
    assert jnp.allclose(d1.factors["0"].blocks[0].A, a1)
    assert jnp.allclose(d2.factors["0"].blocks[0].A, (0.9 * a1 + a2) / 1.9, rtol=1e-6)
    assert jnp.allclose(d3.factors["0"].blocks[0].A, (0.81 * a1 + 0.9 * a2 + a1) / 2.71, rtol=1e-6)


def test_kfac_trains_the_digits_mlp_and_compiles_once():
    x, y = _digits()
    params = MODEL.init(jax.random.key(0), x)
    k = kfac.kfac(MODEL, CE, optim.sgd(0.05, momentum=0.9), damping=0.1)
    state = k.init(params, x[:64], y[:64])
    traces = []  # counted at trace time: one trace is one compilation, whatever JAX's caches hold

    def counted(*args, **kwargs):
        traces.append(1)
        return k.step(*args, **kwargs)

    step = jax.jit(counted)
    first = None
    key = jax.random.key(1)
    for i in range(40):
        key, sub = jax.random.split(key)
        batch = slice((i % 4) * 64, (i % 4 + 1) * 64)
        params, state, value = step(params, state, x[batch], y[batch], key=sub)
        first = float(value) if first is None else first
    assert len(traces) == 1
    assert float(value) < 0.25 * first and np.isfinite(float(value))
    assert int(state.count) == 40


def test_errors():
    with pytest.raises(ValueError, match="damping"):
        kfac.kfac(MODEL, CE, optim.sgd(0.1), damping=0.0)
    with pytest.raises(ValueError, match="decay"):
        kfac.kfac(MODEL, CE, optim.sgd(0.1), decay=1.0)
    with pytest.raises(ValueError, match="inverse_every"):
        kfac.kfac(MODEL, CE, optim.sgd(0.1), inverse_every=0)
    with pytest.raises(TypeError, match="fbp.optim"):
        kfac.kfac(MODEL, CE, "sgd")
    with pytest.raises(ValueError, match="approximation"):
        kfac.kfac(MODEL, CE, optim.sgd(0.1), approximation="mean")
    with pytest.raises(ValueError, match="damping_mode"):
        kfac.kfac(MODEL, CE, optim.sgd(0.1), damping_mode="pi")
    with pytest.raises(ValueError, match="curvature_every"):
        kfac.kfac(MODEL, CE, optim.sgd(0.1), curvature_every=0)


def test_factored_damping_is_martens_and_grosse():
    with jax.enable_x64(True):
        x, y = _digits(64)
        x = x.astype(jnp.float64)
        params = MODEL.init(jax.random.key(0), x)
        k = kfac.kfac(MODEL, CE, optim.sgd(1.0), damping=0.05, damping_mode="factored", mc_samples=None)
        state = k.init(params, x, y)
        _, grads, factors = jax.jit(k._factors_of)(params, x, y)
        nat = jax.jit(lambda g, s, f: k.precondition(g, k.observe(s, f)))(grads, state, factors)
        block = factors["2"].blocks[0]
        a, g = block.A, block.G
        pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / (jnp.trace(g) / g.shape[0]))
        w = jnp.concatenate([grads[2]["w"], grads[2]["b"][None]])
        expected = jnp.linalg.solve(a + pi * jnp.sqrt(0.05) * jnp.eye(a.shape[0]),
                                    w) @ jnp.linalg.inv(g + jnp.sqrt(0.05) / pi * jnp.eye(g.shape[0]))
        got = jnp.concatenate([nat[2]["w"], nat[2]["b"][None]])
        assert jnp.allclose(got, expected, rtol=1e-8, atol=1e-12)


def test_the_damped_inverse_by_cholesky_and_its_eigen_fallback():
    """Factored damping inverts ``M + shift I`` by Cholesky; where rounding left ``M`` a negative
    eigenvalue below ``-shift`` (Cholesky fails), by the eigendecomposition with it set to 0."""
    from fbp.kfac import _by_eigen, _damped_inverse
    with jax.enable_x64(True):
        q = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (5, 5), jnp.float64))[0]
        psd = (q * jnp.array([3.0, 1.0, 0.5, 0.1, 0.0])) @ q.T
        inv = jax.jit(_damped_inverse)(psd, 0.2)
        np.testing.assert_allclose(inv, jnp.linalg.inv(psd + 0.2 * jnp.eye(5)), rtol=1e-12, atol=1e-12)
        rounded = (q * jnp.array([3.0, 1.0, 0.5, 0.1, -1e-9])) @ q.T  # Cholesky of rounded + 1e-12 I fails
        fallback = jax.jit(_damped_inverse)(rounded, 1e-12)
        assert bool(jnp.all(jnp.isfinite(fallback)))
        np.testing.assert_allclose(fallback, _by_eigen(rounded, 1e-12), rtol=1e-10)


def test_curvature_every_skips_the_factors_between_updates():
    x, y = _digits(128)
    params = MODEL.init(jax.random.key(0), x)
    k = kfac.kfac(MODEL, CE, optim.sgd(0.05, momentum=0.9), curvature_every=3)
    state = k.init(params, x[:64], y[:64])
    traces = []  # counted at trace time: one trace is one compilation, whatever JAX's caches hold

    def counted(*args, **kwargs):
        traces.append(1)
        return k.step(*args, **kwargs)

    step = jax.jit(counted)
    seen = []
    for i in range(7):
        params, state, value = step(params, state, x[(i % 2) * 64:][:64], y[(i % 2) * 64:][:64],
                                    key=jax.random.key(i))
        seen.append(state.factors["0"].blocks[0].A)
    changed = [not jnp.array_equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # updated at steps 0, 3, 6
    assert len(traces) == 1 and np.isfinite(float(value))
