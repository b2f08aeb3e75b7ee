"""fit(diagnostics=...): what is recorded and when, the JSON lines beside the checkpoints, a
resumed run's record equal bit for bit to an uninterrupted one's, sequence models with
random layers, and the combinations refused with their reasons."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import diagnostics, losses, nn, optim, privacy
from fbp.diagnostics import record

LOSS = losses.CategoricalCrossEntropy(from_logits=True)
MODEL = nn.Serial(nn.Dense(16), nn.ReLU(), nn.Dense(10))


def _digits(n=200):
    from sklearn.datasets import load_digits

    d = load_digits()
    return jnp.asarray(d.data[:n] / 16.0, jnp.float32), jnp.asarray(d.target[:n])


X, Y = _digits()
PARAMS = MODEL.init(jax.random.PRNGKey(0), X[:1])


def _fit(**kwargs):
    args = dict(key=jax.random.PRNGKey(1), epochs=2, batch_size=32, progress=False, diagnostics="economy")
    return fbp.train.fit(MODEL, LOSS, optim.sgd(0.1), PARAMS, X, Y, **(args | kwargs))


def test_economy_every_second_step():
    r = _fit(diagnostics_every=2, epochs=3)
    steps_per_epoch = -(-200 // 32)
    assert sorted(r.diagnostics) == list(range(0, 3 * steps_per_epoch, 2))
    entry = r.diagnostics[4]
    assert set(entry) == set(diagnostics.PRESETS["economy"]) | {"batch", "learning_rate"}
    assert np.isfinite(entry["alpha"]) and -5 < entry["alpha"] < 5
    assert entry["grad_hist_1d"]["counts"].sum() == 32 * sum(a.size for a in jax.tree_util.tree_leaves(PARAMS))
    assert set(entry["update_ratio"]["layers"]) == {"0", "2"}
    last = max(r.diagnostics)
    assert "alpha" not in r.diagnostics[last] or np.isfinite(r.diagnostics[last]["alpha"])


def test_a_resumed_run_records_what_an_uninterrupted_one_does(tmp_path):
    whole = _fit(epochs=4, checkpoint_dir=tmp_path / "a", scan_epochs=True)
    _fit(epochs=2, checkpoint_dir=tmp_path / "b", scan_epochs=True)
    resumed = _fit(epochs=4, checkpoint_dir=tmp_path / "b", resume=True, scan_epochs=True)
    assert sorted(whole.diagnostics) == sorted(resumed.diagnostics)
    for s, entry in whole.diagnostics.items():
        a, b = json.dumps(record._jsonable(entry), sort_keys=True), json.dumps(record._jsonable(resumed.diagnostics[s]),
                                                                               sort_keys=True)
        assert a == b, s
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = (tmp_path / "b" / record.FILE).read_text().splitlines()
    merged: dict = {}
    for line in map(json.loads, lines):
        merged.setdefault(line["step"], {}).update(line)
    assert sorted(merged) == sorted(whole.diagnostics)
    assert merged[3]["alpha"] == pytest.approx(whole.diagnostics[3]["alpha"], rel=1e-6)


def test_an_interrupted_epochs_lines_are_dropped_on_resume(tmp_path):
    _fit(epochs=2, checkpoint_dir=tmp_path)
    path = tmp_path / record.FILE
    with open(path, "a") as f:  # lines of an epoch whose checkpoint was never written
        f.write(json.dumps({"step": 99, "loss": 1.0}) + "\n")
    r = _fit(epochs=3, checkpoint_dir=tmp_path, resume=True)
    steps = [json.loads(t)["step"] for t in path.read_text().splitlines()]
    assert 99 not in steps and 99 not in r.diagnostics


def test_an_lstm_with_dropout_and_a_transformer_under_fit():
    xs = jax.random.normal(jax.random.PRNGKey(2), (48, 5, 3))
    ys = jax.random.randint(jax.random.PRNGKey(3), (48,), 0, 4)
    for model in (nn.Serial(nn.LSTM(6), nn.LastStep(), nn.Dropout(0.2), nn.Dense(4)),
                  nn.Serial(nn.Dense(8), nn.TransformerBlock(num_heads=2, mlp_dim=16), nn.Flatten(), nn.Dense(4))):
        params = model.init(jax.random.PRNGKey(4), xs[:1])
        r = fbp.train.fit(model, LOSS, optim.adam(1e-2), params, xs, ys, key=jax.random.PRNGKey(5), epochs=2,
                          batch_size=16, progress=False, diagnostics="full")
        entry = r.diagnostics[2]
        for name in ("noise_scale", "inner_test", "ggn_trace", "ggn_max_eigenvalue", "tic_diag", "alpha"):
            assert np.all(np.isfinite(jax.tree_util.tree_leaves(entry[name]))), name


@pytest.mark.parametrize("bad, message", [
    (dict(privacy=privacy.DPSGD(1.0, 1.0)), "privacy: the diagnostics read every example"),
    (dict(precision="bfloat16"), "precision"),
    (dict(telemetry=True), "telemetry"),
    (dict(diagnostics="first class"), "must be one of"),
    (dict(diagnostics=["loss", "curvature"]), "unknown diagnostic 'curvature'"),
    (dict(diagnostics_every=0), "diagnostics_every must be an int >= 1"),
])
def test_refused_with_a_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        _fit(**bad)


def test_batchnorm_in_training_is_named():
    model = nn.Serial(nn.Dense(8), nn.BatchNorm(), nn.Dense(10))
    params = model.init(jax.random.PRNGKey(0), X[:2])
    with pytest.raises(fbp.InputError, match="1"):
        fbp.train.fit(model, LOSS, optim.sgd(0.1), params, X, Y, key=jax.random.PRNGKey(1), epochs=1, batch_size=32,
                      progress=False, diagnostics=["noise_scale"])


def test_a_users_extension_is_recorded_every_step():
    """fit(diagnostics=[...]) takes any engine extension: a per-example one too (the epoch's last,
    smaller batch NaN-padded), equal to the same extension computed by fbp.value_and_grad."""
    from fbp import per_example

    r = _fit(diagnostics=["loss", per_example.GradNorms()], epochs=1, shuffle=False, batch_size=48)
    assert sorted(r.diagnostics) == [0, 1, 2, 3, 4]  # 200 = 4 × 48 + 8
    first = fbp.value_and_grad(MODEL, LOSS, extensions=[per_example.GradNorms()])(PARAMS, X[:48], Y[:48])[-1]
    np.testing.assert_allclose(r.diagnostics[0]["grad_norms"]["0"], first["grad_norms"]["0"], rtol=1e-5)
    last = r.diagnostics[4]["grad_norms"]["0"]
    assert last.shape == (48,) and np.all(np.isfinite(last[:8])) and np.all(np.isnan(last[8:]))
