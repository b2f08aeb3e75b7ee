"""Telemetry against independent computations with JAX autodiff of the plain forward.

The reference for a layer's output cotangent is ``jax.grad`` with respect to a zero perturbation
added to that layer's output in the plain forward (and for its input cotangent, one added to
its input); every other statistic is recomputed from the plain forward with NumPy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import credit, losses, nn, optim, telemetry, train
from fbp.core import InputError, Layer, leaf_layers, map_leaf_params, transform_layers

CCE = losses.CategoricalCrossEntropy(from_logits=True)


@dataclasses.dataclass(frozen=True)
class _Perturbed(Layer):
    """``layer(p, x + e_in) + e_out`` — params ``(p, {"in": e_in, "out": e_out})``; forward only."""

    layer: Layer
    contextual = True

    def forward(self, params, x, **context):
        p, e = params
        x = x if jnp.issubdtype(x.dtype, jnp.integer) else x + e["in"]  # ids have no cotangent
        return self.layer.apply(p, x, **context) + e["out"], None


def reference(model, loss, params, x, y, **context):
    """Per leaf path: (output, d_out, d_in, d_params) from jax.grad of the plain forward."""
    outs, shapes = {}, {}

    @dataclasses.dataclass(frozen=True)
    class Record(Layer):
        layer: Layer
        path: str
        contextual = True

        def forward(self, params, x, **context):
            y = self.layer.apply(params, x, **context)
            outs[self.path], shapes[self.path] = y, (x.shape, y.shape, y.dtype)
            return y, None

    transform_layers(model, lambda path, layer: None if layer.children() else Record(layer, path)).apply(
        params, x, **context)
    perturbed = transform_layers(model, lambda path, layer: None if layer.children() else _Perturbed(layer))

    def with_e(params, e):
        return map_leaf_params(model, params, lambda path, leaf_, p: (p, e[path]))

    zeros = {path: {"in": jnp.zeros(s[0], s[2]), "out": jnp.zeros(s[1], s[2])} for path, s in shapes.items()}
    d_e, d_p = jax.jit(jax.grad(lambda e, p: loss(perturbed.apply(with_e(p, e), x, **context), y), argnums=(0, 1)))(
        zeros, params)
    d_params = dict(telemetry._leaf_entries(model, d_p))
    return {path: (outs[path], d_e[path]["out"], d_e[path]["in"], d_params[path]) for path in shapes}


def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in jax.tree_util.tree_leaves(tree))))


MODEL = nn.Serial(nn.Dense(12), nn.Tanh(), nn.Residual(nn.Serial(nn.LayerNorm(), nn.Dense(12), nn.ReLU())),
                  nn.Parallel(nn.Dense(5), nn.Sigmoid()), nn.Dense(4))


def _data(dtype, n=16):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(k1, (n, 6), dtype)
    return x, jax.random.randint(k2, (n,), 0, 4), MODEL.init(k3, x)


@pytest.mark.parametrize("dtype, use_jit", [(jnp.float64, False), (jnp.float64, True), (jnp.float32, True)],
                         ids=["f64-eager", "f64-jit", "f32-jit"])
def test_every_statistic_equals_its_independent_reference(dtype, use_jit):
    with jax.enable_x64(dtype == jnp.float64):
        _statistics_match(dtype, use_jit)


def _statistics_match(dtype, use_jit):
    x, y, params = _data(dtype)
    f = telemetry.value_grad_and_stats(MODEL, CCE, input_cotangents=True)
    value, grads, stats = (jax.jit(f) if use_jit else f)(params, x, y)
    ref = reference(MODEL, CCE, params, x, y, train=True)
    tol = 1e-10 if dtype == jnp.float64 else 2e-5
    assert set(stats) == {path for path, _ in leaf_layers(MODEL)} == set(ref)
    leaf_params = dict(telemetry._leaf_entries(MODEL, params))
    for path, (out, d_out, d_in, d_params) in ref.items():
        s = {k: float(v) for k, v in stats[path].items()}
        assert set(s) == set(telemetry.STATS)
        o = np.asarray(out, np.float64)
        expected = {"out_mean": o.mean(), "out_std": o.std(), "out_absmax": np.abs(o).max(),
                    "out_zero_fraction": np.mean(o == 0), "d_out_norm": norm(d_out), "d_in_norm": norm(d_in),
                    "param_norm": norm(leaf_params[path]), "d_params_norm": norm(d_params), "nonfinite": 0.0}
        for k, v in expected.items():
            assert s[k] == pytest.approx(v, rel=tol, abs=tol), (path, k)
    v_ref, g_ref = jax.jit(fbp.value_and_grad(MODEL, CCE))(params, x, y)
    assert float(value) == pytest.approx(float(v_ref), rel=1e-12 if dtype == jnp.float64 else 1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_cotangents_training_never_computes_are_nan_unless_asked():
    model = nn.Serial(nn.Reshape((2, 3)), nn.Flatten(), nn.Dense(5), nn.Tanh(), nn.Dense(4))
    x, y, _ = _data(jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    lean = telemetry.value_grad_and_stats(model, CCE)(params, x, y)[2]
    full = telemetry.value_grad_and_stats(model, CCE, input_cotangents=True)(params, x, y)[2]
    nan = {(path, k) for path, s in lean.items() for k, v in s.items() if np.isnan(v)}
    assert nan == {("0", "d_out_norm"), ("0", "d_in_norm"), ("1", "d_out_norm"), ("1", "d_in_norm"),
                   ("2", "d_in_norm")}
    for path, s in lean.items():
        for k, v in s.items():
            assert np.isfinite(full[path][k]) and ((path, k) in nan or v == full[path][k])


def test_every_layer_family_in_a_sequence_model():
    """Embedding, LSTM, attention, a transformer block and pooling over time, probed alike."""
    with jax.enable_x64(True):
        model = nn.Serial(nn.Embedding(11, 8), nn.LearnedPositionalEmbedding(6), nn.TransformerBlock(2, 16),
                          nn.LSTM(8), nn.MultiHeadAttention(2), nn.LastStep(), nn.Dense(3))
        x = jax.random.randint(jax.random.PRNGKey(0), (4, 6), 0, 11)
        y = jnp.arange(4) % 3
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
        _, grads, stats = jax.jit(telemetry.value_grad_and_stats(model, CCE, input_cotangents=True))(params, x, y)
        ref = reference(model, CCE, params, x, y, train=True)
        for path, (_, d_out, d_in, d_params) in ref.items():
            assert float(stats[path]["d_out_norm"]) == pytest.approx(norm(d_out), rel=1e-10), path
            assert float(stats[path]["d_params_norm"]) == pytest.approx(norm(d_params), rel=1e-10, abs=1e-300), path
            if path != "0":  # the Embedding's input is integer ids
                assert float(stats[path]["d_in_norm"]) == pytest.approx(norm(d_in), rel=1e-10), path


def test_a_combinator_without_replace_children_gets_a_clear_error():
    @dataclasses.dataclass(frozen=True)
    class Pair(Layer):
        a: Layer
        b: Layer

        def children(self):
            return {"a": self.a, "b": self.b}

    with pytest.raises(InputError, match=r"at path '1'.*no replace_children"):
        telemetry.probe(nn.Serial(nn.Dense(2), Pair(nn.Dense(2), nn.Tanh())), frozenset(telemetry.STATS))


def test_cli_plots_gradient_flow_under_each_rule(tmp_path, capsys):
    from fbp.__main__ import main

    for rule in ("dfa", "usf"):
        path = tmp_path / f"{rule}.png"
        code = main(["train", "--epochs", "2", "--hidden", "16", "16", "--rule", rule, "--patience", "0",
                     "--no-progress", "--plot-gradients", str(path)])
        out = capsys.readouterr().out
        assert code == 0 and path.stat().st_size > 1000, out
        assert "gradient flow" in out and "finite differences: skipped" in out


def test_the_reference_catches_a_wrong_backward():
    """A layer whose d_x is 1 % off changes the telemetry below it: the reference sees it."""

    @dataclasses.dataclass(frozen=True)
    class Skewed(nn.Tanh):
        def _backward(self, y, d_y):
            return 1.01 * super()._backward(y, d_y)

    with jax.enable_x64(True):
        model = nn.Serial(nn.Dense(8), Skewed(), nn.Dense(3))
        x, y = jax.random.normal(jax.random.PRNGKey(0), (6, 5)), jnp.arange(6) % 3
        params = model.init(jax.random.PRNGKey(1), x)
        stats = telemetry.value_grad_and_stats(model, CCE, input_cotangents=True)(params, x, y)[2]
        ref = reference(model, CCE, params, x, y, train=True)
        assert float(stats["0"]["d_out_norm"]) == pytest.approx(1.01 * norm(ref["0"][1]), rel=1e-12)
        assert float(stats["2"]["d_out_norm"]) == pytest.approx(norm(ref["2"][1]), rel=1e-12)


def test_state_key_vmap_and_scan():
    model = nn.Serial(nn.Dense(8), nn.BatchNorm(), nn.ReLU(), nn.Dropout(0.2), nn.Dense(3))
    x, y = jax.random.normal(jax.random.PRNGKey(0), (8, 5)), jnp.arange(8) % 3
    params = model.init(jax.random.PRNGKey(1), x)
    state, key = model.init_state(params), jax.random.PRNGKey(2)
    f = jax.jit(telemetry.value_grad_and_stats(model, CCE, has_state=True))
    value, grads, new_state, stats = f(params, state, x, y, key=key)
    v_ref, g_ref, s_ref = jax.jit(fbp.value_and_grad(model, CCE, has_state=True))(params, state, x, y, key=key)
    np.testing.assert_allclose(value, v_ref, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), (grads, new_state),
                           (g_ref, s_ref))
    assert 0.3 < float(stats["2"]["out_zero_fraction"]) < 0.7  # ReLU after BatchNorm: about half dead
    with pytest.raises(InputError, match="has_state=True"):
        telemetry.value_grad_and_stats(model, CCE)
    # per-example statistics under vmap, and a scan over steps
    plain = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3))
    p = plain.init(jax.random.PRNGKey(1), x)
    g = telemetry.value_grad_and_stats(plain, CCE)
    per_example = jax.vmap(lambda xi, yi: g(p, xi[None], yi[None])[2])(x, y)
    assert per_example["0"]["d_out_norm"].shape == (8,)
    np.testing.assert_allclose(per_example["0"]["d_out_norm"][3],
                               jax.jit(g)(p, x[3:4], y[3:4])[2]["0"]["d_out_norm"], rtol=1e-5)
    norms = jax.lax.scan(lambda c, i: (c, g(p, x, y)[2]["2"]["d_in_norm"]), 0, jnp.arange(3))[1]
    assert norms.shape == (3,)


def test_alignment_angle_is_the_angle_between_rule_and_gradient():
    with jax.enable_x64(True):
        model = credit.feedback_alignment(nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(8), nn.Tanh(), nn.Dense(3)))
        x, y = jax.random.normal(jax.random.PRNGKey(0), (10, 5)), jnp.arange(10) % 3
        params = model.init(jax.random.PRNGKey(1), x)
        state = model.init_state(params)
        _, grads, _, stats = telemetry.value_grad_and_stats(model, CCE, has_state=True)(params, state, x, y)
        true = jax.grad(lambda p: CCE(model.apply(p, x, state=state), y))(params)
        for i in (0, 2, 4):
            a = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(grads[i])])
            b = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(true[i])])
            expected = np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
            assert float(stats[str(i)]["alignment_angle"]) == pytest.approx(expected, abs=1e-6)
        assert float(stats["4"]["alignment_angle"]) < 1e-4  # the top layer gets the true error
        assert float(stats["0"]["alignment_angle"]) > 10
        assert "alignment_angle" not in stats["1"]
        with pytest.raises(InputError, match="alignment angles need"):
            telemetry.value_grad_and_stats(MODEL, CCE, alignment=True)


def test_fit_records_each_epoch_and_the_plot_draws_it(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    x, y, params = _data(jnp.float32, n=24)
    result = train.fit(MODEL, CCE, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(0), epochs=3,
                       batch_size=None, progress=False, telemetry=True)
    assert set(result.telemetry) == {path for path, _ in leaf_layers(MODEL)}
    assert all(v.shape == (3,) for s in result.telemetry.values() for v in s.values())
    first = telemetry.value_grad_and_stats(MODEL, CCE)(params, x, y)[2]  # batch GD: epoch 1 = one step
    for path, s in first.items():
        for k, v in s.items():
            assert result.telemetry[path][k][0] == pytest.approx(float(v), rel=1e-5, abs=1e-7, nan_ok=True), (path, k)
    fig = telemetry.plot_gradient_flow(result.telemetry, model=MODEL)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"{path} {type(leaf).__name__}" for path, leaf in leaf_layers(MODEL)], labels  # not "layer 0"
    fig.savefig(tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert train.fit(MODEL, CCE, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(0), epochs=1,
                     progress=False).telemetry is None
    with pytest.raises(TypeError, match="telemetry"):
        train.fit(MODEL, CCE, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(0), telemetry="yes")
