"""The checker: it passes correct rules, catches wrong ones, and reports paths and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import fbp
from fbp import catalog, losses, nn
from fbp.__main__ import main


@dataclasses.dataclass(frozen=True, repr=False)
class WrongTanh(nn.Tanh):
    """Deliberately wrong: d tanh = 1 - y instead of 1 - y²."""

    def _backward(self, y, d_y):
        return (1 - y) * d_y


@dataclasses.dataclass(frozen=True)
class DenseWithTransposedBiasBug(nn.Dense):
    """Deliberately wrong: the bias gradient averages instead of sums over the batch."""

    def backward(self, res, d_y):
        d_params, d_x = super().backward(res, d_y)
        return {**d_params, "b": d_params["b"] / d_y.shape[0]}, d_x


def test_catches_a_wrong_activation_rule():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    report = fbp.check.layer(WrongTanh(), {}, x)
    assert not report.ok
    assert {row.against for row in report.failures} == {"jax", "fd"}
    assert all(row.path == "x" for row in report.failures)
    with pytest.raises(AssertionError, match="disagrees with the reference"):
        report.assert_ok()


def test_catches_a_wrong_parameter_rule_and_names_its_path():
    model = nn.Serial(nn.Dense(3), nn.Tanh(), DenseWithTransposedBiasBug(2))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    y = jax.random.randint(jax.random.PRNGKey(1), (5,), 0, 2)
    report = fbp.check.model(model, losses.CategoricalCrossEntropy(from_logits=True),
                             model.init(jax.random.PRNGKey(2), x), x, y)
    assert {row.path for row in report.failures} == {"2/b"}
    assert "FAIL" in str(report) and "2/b" in str(report)


def test_catches_an_error_of_one_part_in_a_million_in_float64():
    class Nudged(nn.Sigmoid):
        def _backward(self, y, d_y):
            return y * (1 - y) * d_y * (1 + 1e-6)

    report = fbp.check.layer(dataclasses.dataclass(frozen=True, repr=False)(Nudged)(), {}, jnp.ones((2, 2)), fd=False)
    assert not report.ok and 5e-7 < report.rows[0].max_rel < 2e-6


def test_catches_a_wrong_loss_rule():
    @dataclasses.dataclass(frozen=True)
    class WrongMSE(losses.MSE):
        def backward(self, res, g=1.0):
            return super().backward(res, g) / 2  # forgot the 2 in d(r²)

    report = fbp.check.loss(WrongMSE(), jnp.ones((3, 2)), jnp.zeros((3, 2)))
    assert not report.ok and report.rows[0].path == "pred"


def test_report_table_columns():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    text = str(fbp.check.layer(nn.Dense(2), nn.Dense(2).init(jax.random.PRNGKey(1), x), x))
    header = text.splitlines()[1]
    for column in ("path", "vs", "max abs err", "max rel err", "judged err", "worst index", "actual (fbp)", "desired"):
        assert column in header
    assert "[float64]  PASS" in text.splitlines()[0]
    rows = {line.split()[0] for line in text.splitlines()[2:-1]}  # the last line: what is judged
    assert rows == {"w", "b", "x", "tangent"}  # the tangent: forward mode (fbp.linear_pass)


def test_float64_is_enabled_only_inside_the_check():
    report = fbp.check.layer(nn.Tanh(), {}, jnp.ones((2, 2)))
    assert report.dtype == "float64" and jnp.ones(1).dtype == jnp.float32


# every case twice: float64 eagerly (what `python -m fbp check` runs) and float32 under jit
CATALOGUE = [("f64", *case) for case in catalog.checks()] + \
    [("f32-jit", *case) for case in catalog.checks(dtype=jnp.float32, jit=True)]


@pytest.mark.parametrize("index", range(len(CATALOGUE)),
                         ids=[f"{mode}-{i}-{name[:40]}" for i, (mode, name, _) in enumerate(CATALOGUE)])
def test_every_builtin_rule_passes(index):
    report = CATALOGUE[index][2]()
    assert report.ok, str(report)


def test_the_catalogue_covers_every_public_layer_and_loss():
    covered = {type(r) for r, _ in catalog.layers()} | {type(c[0]) for c in catalog.contextual_layers()} | {
        type(case[0]) for case in catalog.losses_cases(jax.random.PRNGKey(0))}
    public = {getattr(nn, n) for n in nn.__all__} | {getattr(losses, n) for n in losses.__all__}
    concrete = {c for c in public if isinstance(c, type) and c.__module__.startswith("fbp.") and c not in
                (nn.Layer, nn.Activation, nn.FunctionLayer, losses.Loss)}
    assert concrete <= covered, f"not in the catalogue: {concrete - covered}"


def test_cli_check_prints_the_table_and_exits_zero(monkeypatch, capsys):
    # the CLI's own work (options, table, exit code) on a few cases of each kind: every rule of the
    # catalogue runs, in float64 and in float32 under jit, in test_every_builtin_rule_passes
    for name in ("layers", "contextual_layers", "models"):
        original = getattr(catalog, name)
        monkeypatch.setattr(catalog, name, lambda original=original: original()[:2])
    original_losses = catalog.losses_cases
    monkeypatch.setattr(catalog, "losses_cases", lambda key: original_losses(key)[:2])
    assert main(["check", "--dtype", "float32", "--jit"]) == 0
    out = capsys.readouterr().out
    assert "vs jax: judged err" in out and "Dense(features=7)" in out and "rules pass" in out


def test_cli_check_exits_nonzero_on_a_wrong_rule(monkeypatch, capsys):
    original = catalog.layers
    monkeypatch.setattr(catalog, "layers", lambda: original()[:1] + [(WrongTanh(), (3, 2))])
    monkeypatch.setattr(catalog, "losses_cases", lambda key: [])
    monkeypatch.setattr(catalog, "models", lambda: [])
    monkeypatch.setattr(catalog, "contextual_layers", lambda: [])
    assert main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_train_main_job(tmp_path):
    import subprocess
    import sys

    plot = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "fbp", "train", "--no-progress", "--plot", str(plot)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    accuracy = float(result.stdout.split("test accuracy: ")[1].split()[0])
    assert accuracy >= 0.97
    assert "vs JAX autodiff" in result.stdout and "PASS" in result.stdout
    assert plot.stat().st_size > 1000


def test_a_zero_gradient_row_shows_what_it_is_judged_on_and_every_catalogue_row_is_unique():
    """A near-zero gradient has a huge relative error that is not what is judged: the table says
    so (issue 26: "rel err 1.98e4 ok"); and no two rows of `python -m fbp check` share a name."""
    from fbp import catalog
    from fbp.report import Report, Row, judged

    row = Row("0/b", "fd", 3.5e-10, 1.98e4, "dir 0", 0.0, 3.5e-10, True, error=3.5e-10 / 2.0)
    import dataclasses

    assert judged(row) == "1.7e-10 (abs/scale)"
    assert judged(dataclasses.replace(row, error=1.98e4)) == "2.0e+04 (rel)"
    text = str(Report("fbp.check.layer: Dense(3)", "float64", (row,)))
    assert "judged err" in text and "(abs/scale)" in text and "no meaningful relative error" in text
    names = [name for name, _ in catalog.checks()]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]


def test_cli_train_dashboard(tmp_path, capsys):
    from fbp.__main__ import main

    path = tmp_path / "dashboard.png"
    assert main(["train", "--no-progress", "--epochs", "2", "--hidden", "16", "--patience", "0", "--dashboard",
                 str(path), "--diagnostics", "economy"]) == 0
    out = capsys.readouterr().out
    assert f"diagnostics dashboard (economy, every step) written to {path}" in out
    assert path.stat().st_size > 10000
    with pytest.raises(SystemExit):
        main(["train", "--dashboard", str(path), "--precision", "bfloat16"])
    assert "--dashboard records diagnostics in float32" in capsys.readouterr().err
