"""fbp.influence against dense references in float64: per-example gradients by ``vmap(jax.grad)``
of the plain forward, the GGN of the mean loss by JAX autodiff, the inverse by
``numpy.linalg.solve`` (``_dense_reference``). EK-FAC's ranking is compared with the exact one.
Each check is shown to catch a planted error."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _dense_reference import case, dense, kronecker_dense, per_example_grads, x64  # noqa: F401

from fbp import influence, laplace, losses, nn

LOSS = losses.CategoricalCrossEntropy(from_logits=True)
LAMBDA = 1e-2


def _reference(model, params, state, x, y, xt, yt, matrix):
    train = per_example_grads(model, params, state, x, y, LOSS)
    test = per_example_grads(model, params, state, xt, yt, LOSS)
    inverse = np.linalg.inv(matrix + LAMBDA * np.eye(len(matrix)))
    return test @ inverse @ train.T, np.einsum("np,pq,nq->n", train, inverse, train)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exact_influence_equals_the_dense_inverse(kind):
    model, params, state, x, y = case(kind, batch=10)
    xt, yt = x[:3] * 0.5, y[:3]
    ggn, _ = dense(model, params, state, x, y, LOSS)
    for method, matrix in (("exact", ggn),):
        inf = influence.fit(model, LOSS, params, x, y, method=method, damping=LAMBDA, state=state, batch_size=4)
        scores, own = _reference(model, params, state, x, y, xt, yt, matrix)
        np.testing.assert_allclose(inf.scores(xt, yt), scores, rtol=1e-7, atol=1e-9 * np.abs(scores).max())
        np.testing.assert_allclose(inf.self_influence(), own, rtol=1e-7, atol=1e-9 * np.abs(own).max())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hessian_influence_equals_the_dense_hessian_inverse_and_refuses_an_indefinite_one(kind):
    """``method="hessian"``: the Hessian from the second-order rules against ``jax.hessian``
    (``_dense_reference``), at untrained params where it is indefinite: a damping above
    ``−λ_min`` equals the dense inverse; one below it is refused; the default is raised past it."""
    model, params, state, x, y = case(kind, batch=10)
    xt, yt = x[:3] * 0.5, y[:3]
    ggn, hess = dense(model, params, state, x, y, LOSS)
    lowest = float(np.linalg.eigvalsh(hess)[0])
    assert lowest < 0  # the case this method exists for
    lam = -lowest + 0.05
    inf = influence.fit(model, LOSS, params, x, y, method="hessian", damping=lam, state=state, batch_size=4)
    train = per_example_grads(model, params, state, x, y, LOSS)
    test = per_example_grads(model, params, state, xt, yt, LOSS)
    inverse = np.linalg.inv(hess + lam * np.eye(len(hess)))
    scores = test @ inverse @ train.T
    np.testing.assert_allclose(inf.scores(xt, yt), scores, rtol=1e-7, atol=1e-9 * np.abs(scores).max())
    np.testing.assert_allclose(inf.self_influence(), np.einsum("np,pq,nq->n", train, inverse, train), rtol=1e-7)
    wrong = np.linalg.inv(ggn + lam * np.eye(len(hess)))  # the GGN in the Hessian's place is caught
    assert not np.allclose(inf.scores(xt, yt), test @ wrong @ train.T, rtol=1e-3)
    with pytest.raises(ValueError, match=r"not positive definite .* pass damping > "):
        influence.fit(model, LOSS, params, x, y, method="hessian", damping=-lowest / 2, state=state)
    with pytest.warns(UserWarning, match="would leave H \\+ λI indefinite"):
        chosen = influence.fit(model, LOSS, params, x, y, method="hessian", state=state).terms[0].damping
    assert chosen >= -2 * lowest * 0.999


@pytest.fixture(scope="module")
def mlp():
    model = nn.Serial(nn.Dense(6), nn.Tanh(), nn.Dense(3))
    x = jax.random.normal(jax.random.key(0), (24, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (24,), 0, 3)
    return model, model.init(jax.random.key(2), x), x, y


def test_kronecker_and_similarity_methods_equal_their_formulas(mlp):
    model, params, x, y = mlp
    xt, yt = x[:4] + 0.2, y[:4]
    n = x.shape[0]
    train = per_example_grads(model, params, None, x, y, LOSS)
    test = per_example_grads(model, params, None, xt, yt, LOSS)
    for method in ("kfac", "ekfac", "diag"):
        h = laplace.fit(model, LOSS, params, x, y, structure=method).hessian
        matrix = (np.diag(np.asarray(h.d)) if method == "diag" else kronecker_dense(h, params)) / n
        inverse = np.linalg.inv(matrix + LAMBDA * np.eye(len(matrix)))
        got = influence.fit(model, LOSS, params, x, y, method=method, damping=LAMBDA)
        np.testing.assert_allclose(got.scores(xt, yt), test @ inverse @ train.T, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(influence.fit(model, LOSS, params, x, y, method="gradient").scores(xt, yt),
                               test @ train.T, rtol=1e-9)
    unit = lambda g: g / np.linalg.norm(g, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(influence.fit(model, LOSS, params, x, y, method="cosine").scores(xt, yt),
                               unit(test) @ unit(train).T, rtol=1e-9)
    later = jax.tree_util.tree_map(lambda p: 0.9 * p, params)
    tr = influence.tracin(model, LOSS, [params, later], x, y, learning_rates=[0.5, 0.1])
    want = 0.5 * test @ train.T + 0.1 * per_example_grads(model, later, None, xt, yt, LOSS) @ \
        per_example_grads(model, later, None, x, y, LOSS).T
    np.testing.assert_allclose(tr.scores(xt, yt), want, rtol=1e-9)
    np.testing.assert_allclose(tr.self_influence(), 0.5 * np.sum(train ** 2, 1) + 0.1 * np.sum(
        per_example_grads(model, later, None, x, y, LOSS) ** 2, 1), rtol=1e-9)
    default = influence.fit(model, LOSS, params, x, y, method="kfac")  # λ = 0.1 × the mean eigenvalue
    h = laplace.fit(model, LOSS, params, x, y, structure="kfac").hessian
    lam = 0.1 * np.trace(kronecker_dense(h, params)) / len(train[0]) / n
    matrix = kronecker_dense(h, params) / n
    np.testing.assert_allclose(default.scores(xt, yt), test @ np.linalg.inv(matrix + lam * np.eye(len(matrix)))
                               @ train.T, rtol=1e-8)


def test_tracin_reads_the_params_of_every_epoch_of_a_fit_run(mlp, tmp_path):
    """``tracin(checkpoint_dir)`` equals ``tracin`` of the params after each epoch, got by
    training 1 and 2 epochs from the same key (fit is deterministic given it)."""
    model, params, x, y = mlp
    from fbp import optim, train

    def run(epochs, directory=None):
        return train.fit(model, LOSS, optim.sgd(0.1), params, x, y, key=jax.random.key(4), epochs=epochs,
                         batch_size=8, progress=False, checkpoint_dir=directory, keep_checkpoints=None).params

    second = run(2, tmp_path / "run")
    first = run(1)
    xt, yt = x[:4] + 0.2, y[:4]
    got = influence.tracin(model, LOSS, tmp_path / "run", x, y, learning_rates=[0.1, 0.05])
    want = influence.tracin(model, LOSS, [first, second], x, y, learning_rates=[0.1, 0.05])
    np.testing.assert_allclose(got.scores(xt, yt), want.scores(xt, yt), rtol=1e-12)
    with pytest.raises(ValueError, match="2 learning rates for 1 checkpoints"):
        influence.tracin(model, LOSS, [first], x, y, learning_rates=[0.1, 0.05])
    with pytest.raises(ValueError, match="no checkpoint in"):
        influence.tracin(model, LOSS, tmp_path / "empty", x, y)


def test_ekfac_ranks_like_the_exact_influence_on_a_trained_mlp():
    from scipy.stats import spearmanr
    from sklearn.datasets import load_digits

    import fbp
    from fbp import optim
    digits = load_digits()
    x, y = jnp.asarray(digits.data[:300] / 16.0), jnp.asarray(digits.target[:300])
    model = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(10))
    params = model.init(jax.random.key(0), x)
    opt = optim.adamw(1e-2, weight_decay=1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        _, g = fbp.value_and_grad(model, LOSS)(params, x, y)
        u, state = opt.update(g, state, params)
        return optim.apply_updates(params, u), state

    for _ in range(300):  # trained to a loss of 0.006: influence is a statement about the optimum
        params, state = step(params, state)
    xt, yt = jnp.asarray(digits.data[1500:1520] / 16.0), jnp.asarray(digits.target[1500:1520])
    exact = influence.fit(model, LOSS, params, x, y, method="exact", damping=0.1)
    ek = influence.fit(model, LOSS, params, x, y, method="ekfac", damping=0.1)
    own = spearmanr(ek.self_influence(), exact.self_influence()).statistic
    pairs = spearmanr(np.ravel(ek.scores(xt, yt)), np.ravel(exact.scores(xt, yt))).statistic
    # issue 29's bar (0.975 here; 60 steps instead of 300 gave 0.84). It falls with the damping:
    # the cross-layer blocks EK-FAC drops weigh more (bench_curvature_uses.py --part agreement)
    assert own >= 0.99 and pairs >= 0.9, (own, pairs)
    wrong = dataclasses.replace(ek, x=jnp.roll(x, 1, axis=0))  # planted: inputs and labels misaligned by one
    assert spearmanr(wrong.self_influence(), exact.self_influence()).statistic < 0.5
    assert spearmanr(np.ravel(wrong.scores(xt, yt)), np.ravel(exact.scores(xt, yt))).statistic < 0.5


def test_planted_damping_error_and_bad_input(mlp, monkeypatch):
    model, params, x, y = mlp
    xt, yt = x[:2], y[:2]
    ggn, _ = dense(model, params, None, x, y, LOSS)
    want, _ = _reference(model, params, None, x, y, xt, yt, ggn)
    monkeypatch.setattr(laplace.Dense, "solve", lambda self, v, s, delta: self.vectors @ (
        (self.vectors.T @ v) / (s * self.values + 2 * delta)))
    influence._functions.cache_clear()  # compiled functions are shared: recompile with the planted error
    wrong = influence.fit(model, LOSS, params, x, y, method="exact", damping=LAMBDA).scores(xt, yt)
    assert np.abs(np.asarray(wrong) - want).max() > 1e-3 * np.abs(want).max()
    monkeypatch.undo()
    influence._functions.cache_clear()
    with pytest.raises(ValueError, match="method must be one of"):
        influence.fit(model, LOSS, params, x, y, method="lissa")
    with pytest.raises(ValueError, match="2 learning rates for 1 checkpoints"):
        influence.tracin(model, LOSS, [params], x, y, learning_rates=[1.0, 2.0])
    with pytest.raises(ValueError, match="no checkpoints"):
        influence.tracin(model, LOSS, [], x, y)
