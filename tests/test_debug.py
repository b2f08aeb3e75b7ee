"""find_nonfinite: the first NaN/inf, forward order, then the loss, then backward order."""

import dataclasses

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
    assert (report.path, report.stage, report.quantity) == ("2", "backward", "input cotangent")


def test_loss_stage():
    report = debug.find_nonfinite(MODEL, losses.MSE(), PARAMS, X, jnp.full((6, 3), jnp.inf))
    assert (report.path, report.stage) == ("<loss>", "loss") and "largest prediction" in str(report)


def test_fit_prints_the_report_when_it_stops(capsys):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    y = x @ jnp.ones((4, 1)) * 3
    model = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(1))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = train.fit(model, losses.MSE(), optim.sgd(10.0), model.init(jax.random.PRNGKey(0), x), x, y,
                           key=jax.random.PRNGKey(1), epochs=20, progress=False, batch_size=8,
                           divergence_factor=None)  # run until the NaN
    assert result.diverged
    assert "find_nonfinite:" in capsys.readouterr().out


# --------------------------------------------------------------------------- the producing rule (issue 26)
@dataclasses.dataclass(frozen=True)
class _LogGrad(nn.Dense):
    """A user's layer whose own backward produces NaN (log of a negative cotangent scale)."""

    independent_examples = True

    def backward(self, res, d_y):
        d_params, d_x = super().backward(res, d_y)
        return d_params, d_x * jnp.log(-jnp.ones_like(d_x))


NAN = nn.MapCotangent(lambda g: g * jnp.nan, name="nan")
PLANTED = {
    "serial": (nn.Serial(nn.Dense(8), nn.Tanh(), NAN, nn.Dense(3)), "2"),
    "residual": (nn.Serial(nn.Dense(8), nn.Residual(nn.Serial(nn.Dense(8), NAN, nn.Tanh())), nn.Dense(3)),
                 "1/block/1"),
    "parallel": (nn.Serial(nn.Dense(8), nn.Parallel(nn.Dense(2), nn.Serial(NAN, nn.Dense(1))), nn.Dense(3)),
                 "1/1/0"),
    "user-layer": (nn.Serial(nn.Dense(8), nn.Tanh(), _LogGrad(5), nn.ReLU(), nn.Dense(3)), "2"),
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_a_planted_nan_is_named_at_the_rule_that_produced_it(name):
    """Not the layer that *received* the non-finite cotangent (the one below it)."""
    model, culprit = PLANTED[name]
    report = debug.find_nonfinite(model, CCE, model.init(jax.random.PRNGKey(1), X), X, Y)
    assert (report.path, report.stage, report.quantity) == (culprit, "backward", "input cotangent"), str(report)
    assert f"path '{culprit}'" in str(report) and "received a finite output cotangent" in str(report)


def test_a_combinator_or_a_cotangent_mapping_wrapper_is_named_when_its_own_rule_produced_it():
    from fbp import credit

    base = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3))
    dfa = credit.direct_feedback_alignment(base, X)  # replaces the cotangent below layer 2 by e B_2
    params = dfa.init(jax.random.PRNGKey(1), X)
    state = dfa.init_state(params)
    state["feedback"]["2"] = state["feedback"]["2"].at[0, 0].set(jnp.inf)
    report = debug.find_nonfinite(dfa, CCE, params, X, Y, state=state)
    assert (report.path, report.stage, report.quantity) == ("", "backward", "input cotangent"), str(report)
    assert "DirectFeedbackAlignment" in report.layer
    big = nn.Serial(nn.Dense(8), nn.Residual(nn.Serial(nn.Dense(8), nn.ScaleGradient(1.0))), nn.Dense(3))
    p = big.init(jax.random.PRNGKey(1), X)
    block = {"w": p[1]["block"][0]["w"] * 0, "b": p[1]["block"][0]["b"] + 3e38}
    p = ({"w": p[0]["w"], "b": p[0]["b"] + 3e38}, {"block": (block, {})}, p[2])
    report = debug.find_nonfinite(big, CCE, p, X, Y)  # the sum x + block(x) overflows in the Residual itself
    assert (report.path, report.stage, report.quantity) == ("1", "forward", "output"), str(report)
