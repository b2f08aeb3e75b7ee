"""fbp.laplace against dense references in float64: the GGN of the summed loss by JAX autodiff
of the plain forward (``_dense_reference``), log-determinants by ``numpy.linalg.slogdet``, the
marginal likelihood and the linearised predictive by their formulas — on small models of every
family with curvature rules (MLP, CNN, LSTM, transformer with LayerNorm and attention,
BatchNorm in evaluation mode with state). Each check is shown to catch a planted error."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _dense_reference import CASES, case, dense, jacobians, kronecker_dense, x64  # noqa: F401

from fbp import laplace, losses, nn
from fbp.core import InputError
from fbp.curvature import block_matrix
from fbp.laplace import fitting

LOSS = losses.CategoricalCrossEntropy(from_logits=True)
SUM = dataclasses.replace(LOSS, reduction="sum")
DELTA = 0.7


def marglik(loglik, precision, prior, theta):
    """``log p(D|θ) − ½ (log det P − log det P₀) − ½ θᵀ P₀ θ`` with ``P₀ = diag(prior)``."""
    return loglik - 0.5 * (np.linalg.slogdet(precision)[1] - np.sum(np.log(prior))) - 0.5 * np.sum(prior * theta ** 2)


@pytest.mark.parametrize("kind", list(CASES))
def test_structures_and_marginal_likelihood_equal_dense_references(kind):
    model, params, state, x, y = case(kind)
    ggn, _ = dense(model, params, state, x, y, SUM)
    theta = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
    loglik = -float(SUM(model.apply(params, x, state=state), y))
    eye = np.eye(ggn.shape[0])
    for structure in ("full", "diag", "kfac"):
        la = laplace.fit(model, LOSS, params, x, y, structure=structure, state=state, prior_precision=DELTA,
                         batch_size=4)  # two batches: 4 + 2
        if structure == "full":
            h = np.asarray((la.hessian.vectors * la.hessian.values) @ la.hessian.vectors.T)
            np.testing.assert_allclose(h, ggn, rtol=1e-8, atol=1e-10 * np.abs(ggn).max())
        elif structure == "diag":
            np.testing.assert_allclose(la.hessian.d, np.diag(ggn), rtol=1e-8, atol=1e-12)
            h = np.diag(np.diag(ggn))
        else:
            h = kronecker_dense(la.hessian, params)
            v = np.asarray(jax.random.normal(jax.random.key(1), (h.shape[0],)))
            np.testing.assert_allclose(la.hessian.solve(v, 1.0, DELTA), np.linalg.solve(h + DELTA * eye, v),
                                       rtol=1e-8)
        np.testing.assert_allclose(float(la.log_marginal_likelihood()),
                                   marglik(loglik, h + DELTA * eye, np.full(theta.size, DELTA), theta), rtol=1e-9)
        if structure != "full":  # the probit predictive from the layers' inputs and cotangents (fbp.laplace.variances)
            np.testing.assert_allclose(la.predict(x[:3]), probit_reference(model, params, state, x[:3], h), rtol=1e-9)


def probit_reference(model, params, state, x, h, prior=DELTA):
    """``softmax(f / sqrt(1 + π/8 · diag(J (H + δ)⁻¹ Jᵀ)))`` with dense autodiff Jacobians."""
    jac = jacobians(model, params, state, x)
    var = np.einsum("bcp,pq,bcq->bc", jac, np.linalg.inv(h + np.diag(np.broadcast_to(prior, len(h)))), jac)
    return jax.nn.softmax(np.asarray(model.apply(params, x, state=state)) / np.sqrt(1 + math.pi / 8 * var))


@pytest.fixture(scope="module")
def mlp():
    model = nn.Serial(nn.Dense(6), nn.Tanh(), nn.Dense(3))
    x = jax.random.normal(jax.random.key(0), (20, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (20,), 0, 3)
    params = model.init(jax.random.key(2), x)
    return model, params, x, y


def test_kfac_eigenvalues_and_ekfac_refit_in_the_dense_basis(mlp):
    model, params, x, y = mlp
    ggn, _ = dense(model, params, None, x, y, SUM)
    kfac = laplace.fit(model, LOSS, params, x, y, structure="kfac").hessian
    ek = laplace.fit(model, LOSS, params, x, y, structure="ekfac").hessian
    k_dense, e_dense = kronecker_dense(kfac, params), kronecker_dense(ek, params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    index = unravel(jnp.arange(flat.size, dtype=jnp.float64))
    for (path, eig), leaf in zip(ek.eigen.items(), (index[0], index[2]), strict=True):
        (qa, qg, lam), block = eig[0], ek.blocks[path][0]
        ind = np.asarray(block_matrix(leaf, block)).astype(int).ravel()
        q = np.kron(np.asarray(qa), np.asarray(qg))  # EK-FAC's Λ: the GGN's diagonal in K-FAC's eigenbasis
        np.testing.assert_allclose(np.asarray(lam).ravel(), np.diag(q.T @ ggn[np.ix_(ind, ind)] @ q), rtol=1e-8,
                                   atol=1e-12)
        np.testing.assert_allclose(np.asarray(kfac.eigen[path][0][0]), np.asarray(qa))  # the same basis
    # separate_bias=True: the same blocks without the weight-bias cross terms (laplace-torch's convention)
    split = laplace.fit(model, LOSS, params, x, y, structure="kfac", separate_bias=True)
    s_dense, joint = kronecker_dense(split.hessian, params), k_dense.copy()
    for leaf in (index[0], index[2]):
        b, w = np.asarray(leaf["b"]).astype(int).ravel(), np.asarray(leaf["w"]).astype(int).ravel()
        joint[np.ix_(b, w)] = 0
        joint[np.ix_(w, b)] = 0
    np.testing.assert_allclose(s_dense, joint, atol=1e-10 * np.abs(joint).max())
    v = np.asarray(jax.random.normal(jax.random.key(5), (len(joint),)))
    np.testing.assert_allclose(split.hessian.solve(v, 1.0, DELTA), np.linalg.solve(s_dense + DELTA * np.eye(len(v)), v),
                               rtol=1e-8)
    # the Frobenius-closest matrix in that basis: closer to the GGN's diagonal blocks than K-FAC
    blocks = np.where((k_dense != 0) | np.eye(len(k_dense), dtype=bool), ggn, 0)
    assert np.linalg.norm(e_dense - blocks) < np.linalg.norm(k_dense - blocks)


def test_predictive_equals_the_linearised_formulas(mlp):
    model, params, x, y = mlp
    ggn, _ = dense(model, params, None, x, y, SUM)
    xt = x[:5] + 0.3
    jac = jacobians(model, params, None, xt)
    f = np.asarray(model.apply(params, xt))
    la = laplace.fit(model, LOSS, params, x, y, structure="full", prior_precision=DELTA)
    cov = np.einsum("bcp,pq,bkq->bck", jac, np.linalg.inv(ggn + DELTA * np.eye(len(ggn))), jac)
    got_f, got_cov = la.functional_covariance(xt)
    np.testing.assert_allclose(got_f, f, rtol=1e-12)
    np.testing.assert_allclose(got_cov, cov, rtol=1e-8, atol=1e-12)
    var = np.diagonal(cov, axis1=1, axis2=2)
    probit = jax.nn.softmax(f / np.sqrt(1 + math.pi / 8 * var))
    np.testing.assert_allclose(la.predict(xt, batch_size=3), probit, rtol=1e-9)
    assert np.abs(jax.nn.softmax(f / np.sqrt(1 + math.pi / 4 * var)) - probit).max() > 1e-4  # a wrong constant shows
    mc = la.predict(xt, link="mc", samples=20000, key=jax.random.key(3))
    draws = f + np.einsum("bck,sbk->sbc", np.linalg.cholesky(cov + 1e-10 * np.eye(3)),
                          np.asarray(jax.random.normal(jax.random.key(9), (20000, 5, 3))))
    np.testing.assert_allclose(mc, np.asarray(jax.nn.softmax(draws)).mean(0), atol=0.01)
    # draws of the weights have the posterior's covariance
    for structure in ("full", "diag", "kfac"):
        post = laplace.fit(model, LOSS, params, x, y, structure=structure, prior_precision=DELTA)
        sampled = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(post.sample(jax.random.key(4), 40000))
        h = ggn if structure == "full" else np.diag(np.diag(ggn)) if structure == "diag" else \
            kronecker_dense(post.hessian, params)
        want = np.linalg.inv(h + DELTA * np.eye(len(h)))
        np.testing.assert_allclose(np.cov(np.asarray(sampled).T), want, atol=0.03 * np.abs(want).max())
    nn_probs = la.predict(xt, pred_type="nn", samples=4000, key=jax.random.key(5))
    np.testing.assert_allclose(nn_probs.sum(1), 1, rtol=1e-9)


def test_variances_without_jacobians_under_every_option(mlp, monkeypatch):
    """EK-FAC, one layer only, a prior per layer, separate bias blocks, K-FAC's "reduce" — the
    probit predictive against the dense formula; and the validation-NLL tuning's prepared
    squares against ``nll`` itself. Each route is shown to catch a planted error."""
    model, params, x, y = mlp
    ggn, _ = dense(model, params, None, x, y, SUM)
    xt = x[:4] + 0.2
    for options in ({"structure": "ekfac"}, {"structure": "kfac", "separate_bias": True},
                    {"structure": "kfac", "approximation": "reduce"}, {"structure": "diag", "layers": ["2"]}):
        la = laplace.fit(model, LOSS, params, x, y, prior_precision=DELTA, **options)
        h = np.diag(np.diag(ggn)) if options["structure"] == "diag" else kronecker_dense(la.hessian, params)
        if "layers" in options:  # the first layer is fixed: no variance, as if its prior were infinite
            first = np.setdiff1d(np.arange(len(h)), la.space.indices)
            h[first, first] = 1e300
        np.testing.assert_allclose(la.predict(xt), probit_reference(model, params, None, xt, h), rtol=1e-9,
                                   err_msg=str(options))
    la = laplace.fit(model, LOSS, params, x, y, structure="kfac")
    layered = la._replace(prior_precision=jnp.asarray([0.3, 3.0]))
    prior = np.repeat([0.3, 3.0], [sum(a.size for a in jax.tree_util.tree_leaves(params[0])),
                                   sum(a.size for a in jax.tree_util.tree_leaves(params[2]))])
    np.testing.assert_allclose(layered.predict(xt), probit_reference(model, params, None, xt,
                                                                     kronecker_dense(la.hessian, params), prior),
                               rtol=1e-9)
    score = la._nll_scorer(xt, y[:4])
    for d in (0.05, 2.0):
        assert score(d) == pytest.approx(float(la._replace(prior_precision=jnp.asarray(d)).nll(xt, y[:4])), rel=1e-12)
    from fbp.laplace import variances  # planted: a Kronecker block's inputs left unrotated
    rows = variances._block_rows
    monkeypatch.setattr(variances, "_block_rows", lambda *a: [jnp.concatenate(rows(*a), -1)[..., ::-1]])
    wrong = laplace.fit(model, LOSS, params, x, y, structure="kfac", prior_precision=DELTA)
    assert np.abs(wrong.predict(xt) - probit_reference(model, params, None, xt,
                                                       kronecker_dense(wrong.hessian, params))).max() > 1e-6


def test_the_prior_maximises_the_marginal_likelihood(mlp):
    model, params, x, y = mlp
    la = laplace.fit(model, LOSS, params, x, y, structure="kfac")
    best = la.optimize_prior()
    assert best is not la and float(la.prior_precision) == 1.0  # immutable: a new posterior
    d = float(best.prior_precision)
    at = float(best.log_marginal_likelihood())
    for factor in (0.9, 1.1):
        assert float(la.log_marginal_likelihood(d * factor)) < at
    assert abs(float(jax.grad(la.log_marginal_likelihood)(best.prior_precision))) < 1e-6
    layered = la.optimize_prior(layerwise=True)
    assert layered.prior_precision.shape == (2,)
    assert float(layered.log_marginal_likelihood()) >= at - 1e-9
    val = la.optimize_prior(method="nll", x_val=x, y_val=y, grid=[0.01, 1.0, 100.0])
    scores = [float(la._replace(prior_precision=jnp.asarray(g)).nll(x, y)) for g in (0.01, 1.0, 100.0)]
    assert float(val.prior_precision) == [0.01, 1.0, 100.0][int(np.argmin(scores))]


def test_regression_and_binary_likelihoods(mlp):
    model, params, x, _ = mlp
    targets = jax.random.normal(jax.random.key(7), (20, 3), jnp.float64)
    mse = losses.MSE()
    sigma = 0.8
    la = laplace.fit(model, mse, params, x, targets, structure="full", prior_precision=DELTA, sigma_noise=sigma)
    jac = jacobians(model, params, None, x)
    h = np.einsum("bcp,bcq->pq", jac, jac) / sigma ** 2  # the Gaussian likelihood's GGN
    f = np.asarray(model.apply(params, x))
    loglik = -0.5 * np.sum((f - np.asarray(targets)) ** 2) / sigma ** 2 - 60 * math.log(sigma * math.sqrt(2 * math.pi))
    theta = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
    np.testing.assert_allclose(float(la.log_marginal_likelihood()),
                               marglik(loglik, h + DELTA * np.eye(len(h)), np.full(len(h), DELTA), theta), rtol=1e-9)
    mean, var = la.predict(x[:4])
    cov = np.einsum("bcp,pq,bkq->bck", jac[:4], np.linalg.inv(h + DELTA * np.eye(len(h))), jac[:4])
    np.testing.assert_allclose(mean, f[:4], rtol=1e-12)
    np.testing.assert_allclose(var, np.diagonal(cov, axis1=1, axis2=2) + sigma ** 2, rtol=1e-8)
    tuned = la.optimize_prior(sigma=True)
    assert float(tuned.log_marginal_likelihood()) > float(la.log_marginal_likelihood())
    grads = jax.grad(la.log_marginal_likelihood, argnums=(0, 1))(tuned.prior_precision, tuned.sigma_noise)
    assert max(abs(float(g)) for g in grads) < 1e-5
    binary_model = nn.Serial(nn.Dense(5), nn.Tanh(), nn.Dense(1))
    bp = binary_model.init(jax.random.key(3), x)
    yb = (x[:, :1] > 0).astype(jnp.float64)
    bce = losses.BinaryCrossEntropy(from_logits=True)
    lb = laplace.fit(binary_model, bce, bp, x, yb, structure="full", prior_precision=DELTA)
    gb, _ = dense(binary_model, bp, None, x, yb, dataclasses.replace(bce, reduction="sum"))
    thb = np.asarray(jax.flatten_util.ravel_pytree(bp)[0])
    np.testing.assert_allclose(float(lb.log_marginal_likelihood()), marglik(
        -float(dataclasses.replace(bce, reduction="sum")(binary_model.apply(bp, x), yb)),
        gb + DELTA * np.eye(len(gb)), np.full(len(gb), DELTA), thb), rtol=1e-9)
    assert lb.predict(x[:3]).shape == (3, 1)


def test_last_layer_is_the_dense_ggn_block(mlp):
    model, params, x, y = mlp
    ggn, _ = dense(model, params, None, x, y, SUM)
    la = laplace.fit(model, LOSS, params, x, y, structure="last_layer", prior_precision=DELTA)
    idx = la.space.indices
    assert list(la.space.groups) == ["2"]
    h = np.asarray((la.hessian.vectors * la.hessian.values) @ la.hessian.vectors.T)
    np.testing.assert_allclose(h, ggn[np.ix_(idx, idx)], rtol=1e-8, atol=1e-12)
    jac = jacobians(model, params, None, x[:3])[:, :, idx]
    cov = np.einsum("bcp,pq,bkq->bck", jac, np.linalg.inv(h + DELTA * np.eye(len(h))), jac)
    np.testing.assert_allclose(la.functional_covariance(x[:3])[1], cov, rtol=1e-8, atol=1e-12)


def test_planted_errors_are_caught(mlp, monkeypatch):
    model, params, x, y = mlp
    ggn, _ = dense(model, params, None, x, y, SUM)
    theta = np.asarray(jax.flatten_util.ravel_pytree(params)[0])
    want = marglik(-float(SUM(model.apply(params, x), y)), ggn + DELTA * np.eye(len(ggn)),
                   np.full(len(ggn), DELTA), theta)
    monkeypatch.setattr(laplace.Dense, "logdet", lambda self, s, delta: jnp.sum(jnp.log(self.values + delta)) / 2)
    la = laplace.fit(model, LOSS, params, x, y, structure="full", prior_precision=DELTA)
    assert abs(float(la.log_marginal_likelihood()) - want) > 1e-3
    monkeypatch.undo()
    monkeypatch.setattr("fbp.laplace.fitting._data_term", lambda loss_sum, likelihood, pred, y: loss_sum(pred, y) / 2)
    fitting._batch_function.cache_clear()  # the compiled batch functions are shared between fits
    la = laplace.fit(model, LOSS, params, x, y, structure="full", prior_precision=DELTA)
    assert abs(float(la.log_marginal_likelihood()) - want) > 1e-3
    fitting._batch_function.cache_clear()


def test_bad_input_is_refused(mlp):
    model, params, x, y = mlp
    with pytest.raises(InputError, match="negative log-likelihood"):
        laplace.fit(model, losses.Hinge(), params, x, y)
    with pytest.raises(ValueError, match="structure must be one of"):
        laplace.fit(model, LOSS, params, x, y, structure="kron")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        laplace.fit(model, LOSS, params, x, y, batch_size=0)
    with pytest.raises(TypeError, match="batch_size"):
        laplace.fit(model, LOSS, params, x, y, batch_size=2.5)
    with pytest.raises(InputError, match=r"no layer with parameters at \['7'\]"):
        laplace.fit(model, LOSS, params, x, y, layers=["7"])
    la = laplace.fit(model, LOSS, params, x, y, structure="diag")
    with pytest.raises(ValueError, match="one per layer"):
        la.log_marginal_likelihood(jnp.ones(3))
    with pytest.raises(ValueError, match="sigma=True tunes the noise"):
        la.optimize_prior(sigma=True)
