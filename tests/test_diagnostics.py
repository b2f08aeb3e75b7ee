"""fbp.diagnostics against direct computations: per-example gradients by JAX autodiff of the
plain forward (``vmap`` of its VJP over one-hot cotangents: each example's own gradient), the
dense GGN ``Jᵀ H J`` from ``jax.jacobian``-style rows and ``jax.hessian`` of the loss, in
float64 — on small models of every family kind (MLP, CNN, LSTM, transformer, an embedding,
BatchNorm in evaluation mode with state, Dropout with a key): projections take each route
(a layer's own forward with the direction as params, positions, materialised gradients).
Each check is shown to catch a planted error.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import capabilities, diagnostics, losses
from fbp.diagnostics import moments, step
from fbp.diagnostics.curvature import lanczos_top

LOSS = losses.CategoricalCrossEntropy(from_logits=True)
EACH = dataclasses.replace(LOSS, reduction="none")
PREFIXES = {"mlp": "Serial(Dense(features=8), Tanh()", "cnn": "Conv2D(features=4, kernel_size=3)",
            "lstm": "LSTM(hidden=4)", "transformer": "TransformerBlock(", "batchnorm-eval": "Serial(Conv2D(",
            "dropout": "Dropout(", "embedding": "Embedding("}
CASES = {kind: next(c for c in capabilities.cases() if c[0].startswith(prefix)) for kind, prefix in PREFIXES.items()}
BATCH = 6


def _inputs(kind):
    _, model, shape, ctx = CASES[kind]
    params, state, x, y, key = capabilities.inputs(model, (BATCH, *shape[1:]), ctx)
    return model, params, state, x, y, key, kind != "batchnorm-eval"


def _extensions(params):
    size = sum(a.size for a in jax.tree_util.tree_leaves(params))
    return [diagnostics.NoiseScale(), diagnostics.NormTest(), diagnostics.InnerTest(), diagnostics.OrthoTest(),
            diagnostics.GradientSNR(), diagnostics.GradNorm(), diagnostics.GGNTrace(),
            diagnostics.GGNMaxEigenvalue(iterations=size, key=jax.random.key(5)), diagnostics.TICDiag(),
            diagnostics.GradHistogram1d(bins=20, range=(-0.52, 0.48)),  # edges off 0 and 1: exact zeros and
            diagnostics.GradHistogram2d(bins=(8, 6), range=((-0.31, 0.29), (-1.03, 0.97)))]  # ones sit in a bin


def _reference(model, params, state, x, y, key, train):
    """Per-example gradients ``(B, P)``, the dense GGN ``(P, P)`` and each leaf's slice."""
    pred, pull = jax.vjp(lambda p: model.apply(p, x, state=state, key=key, train=train), params)
    flat = lambda tree: jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    one = lambda e: flat(pull(jax.grad(lambda z: jnp.sum(EACH(z, y) * e))(pred))[0])  # noqa: E731
    per = jax.vmap(one)(jnp.eye(pred.shape[0], dtype=pred.dtype))
    rows = jax.vmap(lambda c: flat(pull(c)[0]))(jnp.eye(pred.size, dtype=pred.dtype).reshape(pred.size, *pred.shape))
    hess = jax.hessian(lambda z: LOSS(z, y))(pred).reshape(pred.size, pred.size)
    slices, start = {}, 0
    for path, leaf in _leaves(model, params).items():
        n = sum(a.size for a in jax.tree_util.tree_leaves(leaf))
        slices[path] = slice(start, start + n)
        start += n
    return np.asarray(per), np.asarray(rows.T @ hess @ rows), slices


def _leaves(model, params):
    out = {}
    fbp.core.map_leaf_params(model, params, lambda path, leaf, p: out.setdefault(path, p))
    return {k: v for k, v in out.items() if jax.tree_util.tree_leaves(v)}


def expected(per, ggn, slices, params_flat, model_leaves):
    """Every quantity from the per-example gradients and the dense GGN (the docstrings' formulas)."""
    b = per.shape[0]
    mean = per.mean(0)
    s, g2 = np.sum(per ** 2), mean @ mean
    trace_cov, grad_sq = (s - b * g2) / (b - 1), (b * g2 - s / b) / (b - 1)
    p = per @ mean
    sgs = np.sum(per ** 2, 0)
    gsnr = mean ** 2 / (sgs / b - mean ** 2 + 1e-5)
    diag = np.diag(ggn)
    hist1 = np.bincount(np.clip(np.floor((per + 0.52) / (1.0 / 20)), 0, 19).astype(int).ravel(), minlength=20)
    gw, pw = 0.6 / 8, 2.0 / 6
    gi = np.clip(np.floor((np.clip(per, -0.31 + gw / 2, 0.29 - gw / 2) + 0.31) / gw), 0, 7).astype(int)
    pi = np.clip(np.floor((np.clip(params_flat, -1.03 + pw / 2, 0.97 - pw / 2) + 1.03) / pw), 0, 5).astype(int)
    hist2 = np.bincount((gi * 6 + pi[None]).ravel(), minlength=48).reshape(8, 6)
    return {"noise_scale": {"b_simple": trace_cov / grad_sq, "trace_cov": trace_cov, "grad_sq": grad_sq},
            "norm_test": np.sqrt(max(trace_cov, 0) / (b * g2)),
            "inner_test": np.sqrt(max((np.sum(p ** 2) - b * g2 ** 2) / (b - 1), 0) / (b * g2 ** 2)),
            "ortho_test": np.sqrt(max((s - np.sum(p ** 2) / g2) / (b - 1), 0) / (b * g2)),
            "gradient_snr": {"mean": gsnr.mean(), "layers": {k: gsnr[v].mean() for k, v in slices.items()}},
            "grad_norm": {"total": np.sqrt(g2), "layers": {k: np.linalg.norm(mean[v]) for k, v in slices.items()}},
            "ggn_trace": {"total": np.trace(ggn), "layers": {k: diag[v].sum() for k, v in slices.items()}},
            "ggn_max_eigenvalue": np.linalg.eigvalsh(ggn)[-1],
            "tic_diag": np.sum((sgs / b) / (diag + 1e-7)),
            "grad_hist_1d": {"counts": hist1, "layers": None}, "grad_hist_2d": {"counts": hist2}}


def _compare(got, want, tol):
    if isinstance(want, dict):
        for k, v in want.items():
            if v is not None:
                _compare(got[k], v, tol)
        return
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


def _run(kind, jit=True):
    model, params, state, x, y, key, train = _inputs(kind)
    f = fbp.value_and_grad(model, LOSS, extensions=_extensions(params), has_state=state is not None, train=train)
    f = jax.jit(f) if jit else f
    out = f(params, state, x, y, key=key) if state is not None else f(params, x, y, key=key)
    flat = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(params)])
    return out[-1], expected(*_reference(model, params, state, x, y, key, train), flat, _leaves(model, params))


@pytest.mark.parametrize("kind", list(CASES))
def test_every_quantity_equals_its_reference(kind):
    with jax.enable_x64(True):
        q, want = _run(kind)
        _compare(q, want, 1e-10)


def test_without_jit():
    with jax.enable_x64(True):
        q, want = _run("mlp", jit=False)
        _compare(q, want, 1e-10)


def test_float32_agrees_with_float64():
    with jax.enable_x64(True):
        model, params, state, x, y, key, train = _inputs("cnn")
        q64 = jax.jit(fbp.value_and_grad(model, LOSS, extensions=_extensions(params)))(params, x, y)[-1]
    to32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
    q32 = jax.jit(fbp.value_and_grad(model, LOSS, extensions=_extensions(params)))(to32(params), to32(x),
                                                                                   y.astype(jnp.int32))[-1]
    for name in ("noise_scale", "norm_test", "inner_test", "ortho_test", "ggn_trace", "tic_diag"):
        _compare(q32[name], jax.tree_util.tree_map(np.asarray, q64[name]), 2e-3)


def test_the_references_catch_planted_errors(monkeypatch):
    """A missing 1/(B−1) (a biased trace estimate) and a flipped projection both fail the comparison."""
    with jax.enable_x64(True):
        model, params, state, x, y, key, train = _inputs("mlp")
        want = expected(*_reference(model, params, state, x, y, key, train),
                        np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(params)]), None)
        biased = lambda context, s, g2: ((s - context.batch * g2) / context.batch,  # noqa: E731
                                         (context.batch * g2 - s / context.batch) / (context.batch - 1))
        monkeypatch.setattr(moments, "_unbiased", biased)
        q = fbp.value_and_grad(model, LOSS, extensions=[diagnostics.NoiseScale()])(params, x, y)[-1]
        with pytest.raises(AssertionError):
            _compare(q["noise_scale"], want["noise_scale"], 1e-10)
        monkeypatch.undo()
        flipped = moments.projections
        monkeypatch.setattr(moments, "projections", lambda kept, v, m: -flipped(kept, v, m) * 1.01)
        q = fbp.value_and_grad(model, LOSS, extensions=[diagnostics.InnerTest()])(params, x, y)[-1]
        with pytest.raises(AssertionError):
            _compare(q["inner_test"], want["inner_test"], 1e-10)


def test_hutchinson_and_lanczos_converge():
    """Hutchinson's trace within 4 standard errors (the exact variance 2(‖G‖²_F − Σ G_ii²)/M) at
    M = 2000, and Lanczos' top eigenvalue to 1e-8 relative after 25 products on a GGN of 200+
    dimensions (a clear gap at the top: cross-entropy's GGN has rank ≤ B (C − 1))."""
    with jax.enable_x64(True):
        model, params, state, x, y, key, train = _inputs("mlp")
        _, ggn, _ = _reference(model, params, state, x, y, key, train)
        hutch = diagnostics.GGNTrace(method="hutchinson", vectors=2000, key=jax.random.key(1))
        lanczos = diagnostics.GGNMaxEigenvalue(iterations=25, key=jax.random.key(2))
        q = jax.jit(fbp.value_and_grad(model, LOSS, extensions=[hutch, lanczos]))(params, x, y)[-1]
        se = np.sqrt(2 * (np.sum(ggn ** 2) - np.sum(np.diag(ggn) ** 2)) / 2000)
        assert abs(float(q["ggn_trace"]["total"]) - np.trace(ggn)) < 4 * se
        assert float(q["ggn_trace"]["stderr"]) == pytest.approx(se, rel=0.3)
        top = np.linalg.eigvalsh(ggn)[-1]
        assert abs(float(q["ggn_max_eigenvalue"]) - top) < 1e-8 * top
        # a planted error: one product too few of the right matrix (a scaled matvec) is caught
        wrong = lanczos_top(lambda v: 0.9 * jnp.asarray(ggn) @ v, ggn.shape[0], 25, jax.random.key(2), jnp.float64)
        assert abs(float(wrong) - top) > 1e-3 * top


def _cockpit_alpha(t, fs, dfs, var_fs, var_dfs):
    """Cockpit's own α (``cockpit/quantities/alpha.py``: ``_fit_quadratic`` and ``_get_alpha``), in NumPy."""
    phi = np.array([[1, 0, 0], [1, t, t ** 2], [0, 1, 0], [0, 1, 2 * t]]).T
    lam = np.linalg.inv(np.diag([v if v != 0 else 1e-10 for v in var_fs + var_dfs]))
    mu = np.linalg.inv(phi @ lam @ phi.T) @ phi @ lam @ np.array(fs + dfs)
    return -1.0 if mu[2] < 0 else 2 * t / (-mu[1] / mu[2]) - 1


def test_alpha_equals_cockpits_formula_and_catches_a_sign_flip():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for _ in range(20):
            f0, f1 = rng.uniform(1, 2, 2)
            df0, df1 = -rng.uniform(0.1, 1), rng.normal()
            v = list(rng.uniform(0.01, 0.5, 4))
            t = float(rng.uniform(0.1, 2))
            got = step.alpha(step.Point(f0, v[0], df0, v[2]), step.Point(f1, v[1], df1, v[3]), t)
            want = _cockpit_alpha(t, [f0, f1], [df0, df1], v[:2], v[2:])
            assert float(got) == pytest.approx(want, abs=1e-10)
            flipped = step.alpha(step.Point(f0, v[0], -df0, v[2]), step.Point(f1, v[1], -df1, v[3]), t)
            assert want == -1.0 or float(flipped) != pytest.approx(want, abs=1e-6)


def _digits(n=120):
    from sklearn.datasets import load_digits

    d = load_digits()
    return jnp.asarray(d.data[:n] / 16.0), jnp.asarray(d.target[:n])


def test_fit_alpha_and_steps_equal_a_direct_computation():
    """Full-batch SGD (every step sees the same batch): the recorded α of step 0, the update
    size, ratio and distance equal the same numbers from vmap(grad) and the params."""
    with jax.enable_x64(True):
        x, y = _digits(40)
        model = fbp.nn.Serial(fbp.nn.Dense(8), fbp.nn.Tanh(), fbp.nn.Dense(10))
        params = model.init(jax.random.PRNGKey(0), x[:1])
        lr = 0.5
        r = fbp.train.fit(model, LOSS, fbp.optim.sgd(lr), params, x, y, key=jax.random.PRNGKey(1), epochs=2,
                          batch_size=None, shuffle=False, progress=False,
                          diagnostics=["alpha", "update_size", "update_ratio", "distance", "loss"])

        def point(p, d):
            per = jax.vmap(lambda xb, yb: jax.grad(lambda q: LOSS(model.apply(q, xb[None]), yb[None]))(p))(x, y)
            proj = sum(jnp.tensordot(a.reshape(a.shape[0], -1), b.ravel(), 1)
                       for a, b in zip(jax.tree_util.tree_leaves(per), jax.tree_util.tree_leaves(d), strict=True))
            losses_b = EACH(model.apply(p, x), y)
            t = jnp.sqrt(sum(jnp.sum(b ** 2) for b in jax.tree_util.tree_leaves(d)))
            return step.Point(losses_b.mean(), losses_b.var(ddof=1), (proj / t).mean(), (proj / t).var(ddof=1)), t

        grads0 = jax.grad(lambda p: LOSS(model.apply(p, x), y))(params)
        d = jax.tree_util.tree_map(lambda g: -lr * g, grads0)
        p1 = jax.tree_util.tree_map(lambda a, b: a + b, params, d)
        (start, t), (end, _) = point(params, d), point(p1, d)
        want = _cockpit_alpha(float(t), [float(start.f), float(end.f)], [float(start.df), float(end.df)],
                              [float(start.var_f), float(end.var_f)], [float(start.var_df), float(end.var_df)])
        assert r.diagnostics[0]["alpha"] == pytest.approx(want, abs=1e-10)
        assert r.diagnostics[0]["update_size"]["total"] == pytest.approx(float(t), rel=1e-12)
        norm = lambda tree: np.sqrt(sum(np.sum(np.asarray(a) ** 2) for a in jax.tree_util.tree_leaves(tree)))  # noqa
        assert r.diagnostics[0]["update_ratio"]["layers"]["0"] == pytest.approx(norm(d[0]) / norm(params[0]),
                                                                               rel=1e-12)
        assert r.diagnostics[1]["distance"]["total"] == pytest.approx(
            float(jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(r.params),
                                                                     jax.tree_util.tree_leaves(params),
                                                                     strict=True)))), rel=1e-10)
        assert r.diagnostics[0]["loss"] == pytest.approx(float(start.f), rel=1e-12)


def test_sampled_histogram_elements_are_per_example_gradient_entries():
    """A convolution's sampled elements ``Σ_t x_bti g_btj`` equal the reference per-example
    gradients at the drawn (example, row, column) to 1e-10, and a histogram sampled at every
    leaf (max_exact=0) is within sampling error of the exact one."""
    from fbp.probes import _PerExample

    with jax.enable_x64(True):
        model, params, state, x, y, key, train = _inputs("cnn")
        conv = model.layers[0]
        y0, res = fbp.core.run_forward(conv, params[0], x)
        d_y = jax.random.normal(jax.random.PRNGKey(9), y0.shape)
        (group,), _ = conv.per_example_positions(res, d_y)
        per = jax.vmap(lambda xb, gb: conv.backward(fbp.core.run_forward(conv, params[0], xb[None])[1],
                                                    gb[None])[0]["w"])(x, d_y)
        for _, values, ex, rows, cols, weight in group.sample(jax.random.key(3), 500):
            want = per.reshape(per.shape[0], -1, per.shape[-1])[ex, rows, cols]
            np.testing.assert_allclose(values, want, rtol=1e-10, atol=1e-12)
            assert weight * values.size == pytest.approx(per.size / 9, rel=0.05)  # 9 taps share the draws
        assert _PerExample is not None
        exact = diagnostics.GradHistogram1d(bins=20, range=(-0.52, 0.48))
        sampled = diagnostics.GradHistogram1d(bins=20, range=(-0.52, 0.48), samples=1 << 15, max_exact=0,
                                              key=jax.random.key(4))
        q = jax.jit(fbp.value_and_grad(model, LOSS, extensions=[exact]))(params, x, y)[-1]
        s = jax.jit(fbp.value_and_grad(model, LOSS, extensions=[dataclasses.replace(sampled)]))(params, x, y)[-1]
        a, b = np.asarray(q["grad_hist_1d"]["counts"]), np.asarray(s["grad_hist_1d"]["counts"])
        assert b.sum() == pytest.approx(a.sum(), rel=1e-9)
        assert np.abs(a / a.sum() - b / b.sum()).sum() < 0.05


def test_monte_carlo_trace_and_tic_share_the_sampled_columns():
    """GGNTrace(method="mc") and TICDiag(curvature="mc") read the one sampled column pass that
    DiagGGNMC(1) reads: the trace is that diagonal's sum, the TIC its ratio with Σ_b g_b²/B."""
    from fbp import curvature, per_example

    with jax.enable_x64(True):
        model, params, state, x, y, key, train = _inputs("mlp")
        exts = [diagnostics.GGNTrace(method="mc"), diagnostics.TICDiag(curvature="mc"), curvature.DiagGGNMC(1),
                per_example.SumGradSquared()]
        q = jax.jit(fbp.value_and_grad(model, LOSS, extensions=exts))(params, x, y, key=jax.random.key(4))[-1]
        mc, sgs = q["diag_ggn_mc"], q["sum_grad_squared"]
        leaves = lambda t: jax.tree_util.tree_leaves(t)  # noqa: E731
        assert float(q["ggn_trace"]["total"]) == pytest.approx(float(sum(jnp.sum(a) for a in leaves(mc))), rel=1e-12)
        tic = sum(jnp.sum((s / BATCH) / (d + 1e-7)) for s, d in zip(leaves(sgs), leaves(mc), strict=True))
        assert float(q["tic_diag"]) == pytest.approx(float(tic), rel=1e-12)
        with pytest.raises(ValueError, match="curvature must be"):
            diagnostics.TICDiag(curvature="hessian")


def test_a_warm_started_lanczos_converges_in_few_steps():
    """fit's top eigenvalue runs 5 Lanczos steps from the last step's Ritz vector: from a start
    near the top eigenvector (the matrix moved a little; an error that shrinks like the start's
    squared distance) 5 steps are within 1e-5 relative of λ_max (gap 10 : 9), where 5 steps from a
    random start are 0.5 % off; the returned Ritz vector is the top eigenvector."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        q_, _ = np.linalg.qr(rng.normal(size=(60, 60)))
        values = np.concatenate([[10.0, 9.0], np.linspace(0, 8.5, 58)])
        a = jnp.asarray(q_ @ np.diag(values) @ q_.T)
        near = jnp.asarray(q_[:, 0] + 0.01 * rng.normal(size=60))
        warm, vector = lanczos_top(lambda v: a @ v, 60, 5, jax.random.key(0), jnp.float64, near, with_vector=True)
        cold = lanczos_top(lambda v: a @ v, 60, 5, jax.random.key(0), jnp.float64)
        assert abs(float(warm) - 10.0) < 1e-4 and abs(float(cold) - 10.0) > 5e-2
        assert abs(abs(float(vector @ q_[:, 0])) - 1) < 1e-4


def test_every_diagnostic_extension_is_checked():
    """Each extension class of fbp.diagnostics is among those compared with a reference above
    (the capability table's test leaves them to this file)."""
    from fbp.extensions import Extension

    def subclasses(cls):
        return {c for s in cls.__subclasses__() for c in {s} | subclasses(s)}

    mine = {c.name for c in subclasses(Extension) if c.__module__.startswith("fbp.diagnostics") and
            not c.__name__.startswith("_")}
    checked = {e.name for e in _extensions({"w": jnp.zeros(3)})}
    assert mine == checked, mine ^ checked
