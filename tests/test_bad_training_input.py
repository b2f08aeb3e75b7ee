"""Hardening of training: a diverging fit, exploding gradients, early stopping, labels out of
range and target conventions (issue 9; the other bad inputs are in test_bad_input.py).

Each test asserts either the exception type *and* that the message names what a user must fix,
or the specified behaviour (finite params, a stop reason, a warning, a NaN under jit).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bad_input_common import CCE, KEY, PARAMS, CountingOptimizer, X, Y, _fit, _leaves_finite, _same

from fbp import losses, nn, optim, train
from fbp.__main__ import main as cli
from fbp.core import InputError


# --------------------------------------------------------------------------- 1. a diverging fit
def test_diverging_fit_warns_records_why_and_returns_the_initial_params():
    with pytest.warns(RuntimeWarning, match="non-finite: loss is nan at epoch 1"):
        result = _fit(opt=optim.sgd(1e30), epochs=5)
    assert result.diverged and result.stop_reason.startswith("non-finite: loss")
    assert result.epochs_run == 1 and _leaves_finite(result.params) and _same(result.params, PARAMS)


def test_diverging_fit_returns_the_last_finite_epoch():
    x = jax.random.normal(KEY, (32, 4))
    y = 3 * x.sum(axis=1, keepdims=True)
    model = nn.Dense(1)
    params = model.init(KEY, x)
    kw = dict(model=model, loss=losses.MSE(), params=params, x=x, y=y, batch_size=None,
              divergence_factor=None)  # judged by NaN/inf alone (the run-away loss is tested below)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = _fit(opt=optim.sgd(10.0), epochs=200, **kw)
    assert result.diverged and 1 < result.epochs_run < 200 and _leaves_finite(result.params)
    last_finite = result.epochs_run - 1
    assert np.isfinite(result.history["loss"][:last_finite]).all()
    again = _fit(opt=optim.sgd(10.0), epochs=last_finite, **kw)  # deterministic: the same run, stopped in time
    assert not again.diverged and _same(result.params, again.params) and _same(result.opt_state, again.opt_state)


def test_nan_validation_metric_is_never_an_improvement():
    stop = train.EarlyStopping("val_loss")
    assert not stop.better(float("nan"), 1.0) and not stop.better(float("inf"), 1.0)
    assert not train.EarlyStopping("val_accuracy").better(float("nan"), 0.5)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = _fit(opt=optim.sgd(1e30), epochs=5, validation_split=0.25, early_stopping=stop)
    assert result.diverged and result.best_epoch is None and _same(result.params, PARAMS)


def test_cli_reports_divergence_and_exits_nonzero(capsys):
    with pytest.warns(RuntimeWarning):
        code = cli(["train", "--optimizer", "sgd", "--lr", "1e30", "--epochs", "2", "--hidden", "8", "--no-progress",
                    "--patience", "0"])
    out = capsys.readouterr()
    assert code == 1 and "diverged" in out.err and "non-finite" in out.out


# --------------------------------------------------------------------------- 2. clipping exploding gradients
def test_clip_by_global_norm_survives_gradients_whose_squares_overflow():
    grads = {"w": jnp.full((4, 3), 3e19, jnp.float32), "b": jnp.full((3,), -1e30, jnp.float32)}
    clip = optim.clip_by_global_norm(1.0)
    updates, state = jax.jit(clip.update)(grads, clip.init(grads))
    assert _leaves_finite(updates) and np.isfinite(float(optim.global_norm(grads)))
    np.testing.assert_allclose(float(optim.global_norm(updates)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(state.global_norm), float(np.sqrt(3 * 1e60 + 12 * 9e38)), rtol=1e-5)
    # direction kept: the clipped update is the gradient scaled by one positive factor
    np.testing.assert_allclose(np.asarray(updates["w"]) / np.asarray(updates["b"][0]), 3e19 / -1e30, rtol=1e-5)
    # a NaN gradient is not hidden
    bad = {"w": grads["w"].at[0, 0].set(jnp.nan), "b": grads["b"]}
    assert not _leaves_finite(clip.update(bad, clip.init(bad))[0])


# --------------------------------------------------------------------------- 3. early stopping settings
@pytest.mark.parametrize("kwargs, match", [({"mode": "Max"}, "mode must be one of"), ({"mode": "bogus"}, "mode"),
                                           ({"patience": 0}, "patience"), ({"min_delta": -1.0}, "min_delta"),
                                           ({"min_delta": float("nan")}, "min_delta")])
def test_early_stopping_validates_its_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.EarlyStopping("val_loss", **kwargs)


def test_early_stopping_monitor_is_checked_before_training():
    opt = CountingOptimizer()
    y = jnp.ones((len(X), 3))
    with pytest.raises(ValueError, match=r"monitors 'accuracy'.*records only \['loss'\].*classification"):
        _fit(loss=losses.MSE(), y=y, opt=opt(), early_stopping=train.EarlyStopping("accuracy"))
    with pytest.raises(ValueError, match="monitors 'val_acc'"):
        _fit(opt=opt(), validation_split=0.25, early_stopping=train.EarlyStopping("val_acc"))
    assert opt.calls == 0


# --------------------------------------------------------------------------- 4. labels out of range
@pytest.mark.parametrize("loss", [CCE, losses.CategoricalCrossEntropy(), losses.MulticlassHinge()],
                         ids=["cce-logits", "cce-probs", "multiclass-hinge"])
def test_out_of_range_labels_raise_eagerly_and_give_nan_under_jit(loss):
    pred = jax.nn.softmax(jax.random.normal(KEY, (4, 3)))
    for labels in (jnp.array([0, 1, 3, 2]), jnp.array([0, -1, 1, 2])):
        with pytest.raises(InputError, match=r"labels must lie in \[0, 3\).*index \((1|2),\)"):
            loss(pred, labels)
        value = jax.jit(loss)(pred, labels)
        grad = jax.jit(lambda p, t: loss.backward(loss.forward(p, t)[1]))(pred, labels)
        assert np.isnan(float(value)) and np.isnan(np.asarray(grad)).any()
    assert np.isfinite(float(jax.jit(loss)(pred, jnp.array([0, 1, 2, 2]))))


def test_fit_checks_labels_against_the_model_output_width():
    opt = CountingOptimizer()
    with pytest.raises(InputError, match=r"training data: .*labels must lie in \[0, 3\)"):
        _fit(y=Y.at[5].set(3), opt=opt())  # no num_classes: the model's 3 outputs decide
    with pytest.raises(InputError, match=r"validation data: .*labels must lie in \[0, 3\)"):
        _fit(opt=opt(), validation_data=(X[:4], jnp.array([0, 1, 2, 7])))
    assert opt.calls == 0


# --------------------------------------------------------------------------- 5. target conventions
@pytest.mark.parametrize("loss, pred, target, match", [
    (losses.BinaryCrossEntropy(from_logits=True), jnp.zeros((3, 1)), jnp.array([[1.0], [5.0], [0.0]]),
     r"binary targets must lie in \[0, 1\]; found 5.0"),
    (losses.BinaryCrossEntropy(from_logits=False), jnp.array([[0.5], [1.7], [0.1]]), jnp.ones((3, 1)),
     r"probabilities in \[0, 1\]; found 1.7.*from_logits=True"),
    (losses.Hinge(), jnp.zeros((3, 1)), jnp.array([[1.0], [0.0], [1.0]]), r"-1 or \+1.*2 \* y - 1"),
    (losses.CategoricalCrossEntropy(from_logits=False), jnp.array([[0.5, 1.5], [0.2, 0.8]]), jnp.array([0, 1]),
     "probabilities"),
    (losses.CategoricalCrossEntropy(from_logits=True), jnp.zeros((2, 2)), jnp.array([[1.0, 0.0], [-0.5, 1.5]]),
     "non-negative"),
    (losses.MulticlassHinge(), jnp.zeros((2, 2)), jnp.array([[1.0, 0.0], [0.5, 0.5]]), "one-hot"),
])
def test_targets_of_the_wrong_convention(loss, pred, target, match):
    with pytest.raises(InputError, match=match):
        loss(pred, target)
    assert np.isnan(float(jax.jit(loss)(pred, target)))  # under jit: NaN, never a plausible number


def test_fit_refuses_hinge_labels_and_raw_scores_before_training():
    opt = CountingOptimizer()
    model = nn.Dense(1)
    y01 = (X[:, :1] > 0).astype(jnp.float32)
    params = model.init(KEY, X)
    with pytest.raises(InputError, match=r"2 \* y - 1"):
        _fit(model=model, loss=losses.Hinge(), params=params, y=y01, opt=opt())
    with pytest.raises(InputError, match="initial predictions: .*probabilities"):  # a Dense ends the model: no sigmoid
        _fit(model=model, loss=losses.BinaryCrossEntropy(), params=params, y=y01, opt=opt())
    assert opt.calls == 0


# --------------------------------------------------------------------------- a finite run-away loss (issue 26)
def test_a_finite_but_diverging_run_is_reported_as_diverged_with_the_epoch():
    """adam(1e9) keeps the loss finite (about 5e19 after one epoch): before, "completed"."""
    x = jax.random.normal(KEY, (64, 4))
    model = nn.Serial(nn.Dense(16), nn.ReLU(), nn.Dense(3))
    params = model.init(KEY, x)
    y = jnp.arange(64) % 3
    for stop in (None, train.EarlyStopping("loss", patience=3)):
        with pytest.warns(RuntimeWarning, match=r"diverged: the training loss .* at epoch 1 is more than 1000 times"):
            result = _fit(model=model, params=params, x=x, y=y, opt=optim.adam(1e9), epochs=4, early_stopping=stop)
        assert result.diverged and result.diverged_at == 1 and result.epochs_run == 1
        assert np.isfinite(result.history["loss"]).all() and _same(result.params, params)
    calm = _fit(model=model, params=params, x=x, y=y, opt=optim.adam(1e-2), epochs=4)
    assert not calm.diverged and calm.diverged_at is None and calm.stop_reason == "completed 4 epochs"
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        off = _fit(model=model, params=params, x=x, y=y, opt=optim.adam(1e9), epochs=2, divergence_factor=None)
    assert not off.diverged and not [w for w in seen if "diverged" in str(w.message)]  # None: NaN/inf alone


def test_divergence_is_judged_against_the_loss_before_training_not_noise_near_zero():
    from fbp.train import _growth_reason

    assert _growth_reason({"initial": 2.3, "lowest": 1e-9, "lowest_epoch": 5, "at": None}, 1e-4, 6, 1e3) is None
    reason = _growth_reason({"initial": 2.3, "lowest": 0.01, "lowest_epoch": 5, "at": None}, 12.0, 6, 1e3)
    assert reason.startswith("diverged: the training loss 12 at epoch 7") and "after epoch 6" in reason
    assert _growth_reason({"initial": 2.3, "lowest": 0.01, "lowest_epoch": 5, "at": None}, 12.0, 6, None) is None
    with pytest.raises(ValueError, match="divergence_factor"):
        _fit(epochs=1, divergence_factor=0.5)


def test_cli_verdict_says_diverged_for_a_finite_run_away(capsys):
    with pytest.warns(RuntimeWarning, match="diverged"):
        code = cli(["train", "--lr", "1e9", "--epochs", "2", "--hidden", "8", "--no-progress", "--patience", "0"])
    out = capsys.readouterr()
    assert code == 1 and "verdict: diverged at epoch 1" in out.err and "FAIL" not in out.out


def test_cli_regression_loss_runs_end_to_end_and_bad_pairs_are_refused_up_front(capsys, tmp_path):
    assert cli(["train", "--loss", "mse", "--epochs", "1", "--hidden", "8", "--no-progress"]) == 0
    assert "test accuracy (largest output)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli(["train", "--precision", "bfloat16", "--plot-gradients", str(tmp_path / "g.png")])
    assert exc.value.code == 2 and "cannot be combined with --precision bfloat16" in capsys.readouterr().err
