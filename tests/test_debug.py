"""find_nonfinite: the first NaN/inf, forward order, then the loss, then backward order."""

import jax
import jax.numpy as jnp
import pytest

from fbp import debug, losses, nn, optim, train

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MODEL = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(8), nn.ReLU(), nn.Dense(3))
X = jax.random.normal(jax.random.PRNGKey(0), (6, 5))
Y = jnp.arange(6) % 3
PARAMS = MODEL.init(jax.random.PRNGKey(1), X)


def test_all_finite():
    report = debug.find_nonfinite(MODEL, CCE, PARAMS, X, Y)
    assert report.path is None and not report and "every output" in str(report)


def test_forward_localised_to_the_first_layer_whose_output_breaks():
    params = list(PARAMS)
    params[2] = {"w": params[2]["w"].at[1, 1].set(jnp.inf), "b": params[2]["b"]}
    report = debug.find_nonfinite(MODEL, CCE, tuple(params), X, Y)
    assert (report.path, report.stage, report.quantity) == ("2", "forward", "output")
    assert report.count == 6 and report.nonfinite_params == ("2/w",) and "Dense(features=8)" in str(report)
    x = X.at[0, 0].set(jnp.nan)
    report = debug.find_nonfinite(MODEL, CCE, PARAMS, x, Y)
    assert report.path == "0" and not report.inputs_finite


def test_backward_localised_in_backward_order():
    model = nn.Serial(nn.Dense(8), nn.Tanh(), nn.MapCotangent(lambda g: g / 0.0), nn.Dense(3))
    params = model.init(jax.random.PRNGKey(1), X)
    report = debug.find_nonfinite(model, CCE, params, X, Y)
    assert (report.path, report.stage, report.quantity) == ("1", "backward", "output cotangent")


def test_loss_stage():
    report = debug.find_nonfinite(MODEL, losses.MSE(), PARAMS, X, jnp.full((6, 3), jnp.inf))
    assert (report.path, report.stage) == ("<loss>", "loss") and "largest prediction" in str(report)


def test_fit_prints_the_report_when_it_stops(capsys):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    y = x @ jnp.ones((4, 1)) * 3
    model = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(1))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = train.fit(model, losses.MSE(), optim.sgd(10.0), model.init(jax.random.PRNGKey(0), x), x, y,
                           key=jax.random.PRNGKey(1), epochs=20, progress=False, batch_size=8)
    assert result.diverged
    assert "find_nonfinite:" in capsys.readouterr().out
