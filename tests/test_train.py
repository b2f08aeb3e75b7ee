"""The training loop: step, GD variants, scan == loop, determinism, early stopping, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn, optim, train

MODEL = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(3))
LOSS = losses.CategoricalCrossEntropy(from_logits=True)


def _blobs(n=90, key=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    y = jax.random.randint(k1, (n,), 0, 3)
    centers = jnp.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]])
    return centers[y] + 0.6 * jax.random.normal(k2, (n, 2)), y


def _fit(**kw):
    x, y = _blobs()
    params = MODEL.init(jax.random.PRNGKey(0), x)
    return train.fit(MODEL, LOSS, kw.pop("optimizer", optim.sgd(0.1)), params, x, y, key=jax.random.PRNGKey(1),
                     progress=False, **kw)


def test_step_matches_manual_update():
    x, y = _blobs()
    params = MODEL.init(jax.random.PRNGKey(0), x)
    opt = optim.sgd(0.5)
    new, state, value = train.make_step(MODEL, LOSS, opt)(params, opt.init(params), x, y)
    v, g = fbp.value_and_grad(MODEL, LOSS)(params, x, y)
    np.testing.assert_allclose(value, v, rtol=1e-6)
    np.testing.assert_allclose(new[0]["w"], params[0]["w"] - 0.5 * g[0]["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch_size, steps_per_epoch", [(None, 1), (1, 90), (16, 6)])
def test_gradient_descent_variants(batch_size, steps_per_epoch):
    result = _fit(epochs=3, batch_size=batch_size, optimizer=optim.sgd(0.05))
    assert result.history["loss"].shape == (3,) and result.history["loss"][-1] < result.history["loss"][0]
    # the step count in the optimizer state tells how many updates were made
    assert int(result.opt_state[1].count) == 3 * steps_per_epoch


def test_scan_epochs_equal_python_loop_and_runs_are_deterministic():
    a = _fit(epochs=4, batch_size=16, scan_epochs=True)
    b = _fit(epochs=4, batch_size=16, scan_epochs=False)
    c = _fit(epochs=4, batch_size=16, scan_epochs=False)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)
    for p, q, r in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                       jax.tree_util.tree_leaves(c.params)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(q, r)


def test_learns_and_records_metrics():
    result = _fit(epochs=30, batch_size=16, optimizer=optim.adam(0.05), validation_split=0.2)
    h = result.history
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"} <= set(h)
    assert h["accuracy"][-1] > 0.9 and h["val_accuracy"][-1] > 0.85
    np.testing.assert_allclose(h["learning_rate"], 0.05, rtol=1e-6)


def test_early_stopping_restores_the_best_epoch():
    x, y = _blobs()
    x_val, y_val = _blobs(30, key=5)
    params = MODEL.init(jax.random.PRNGKey(0), x)
    # a learning rate that is too large: the validation loss gets worse after a few epochs
    result = train.fit(MODEL, LOSS, optim.sgd(3.0, momentum=0.9), params, x, y, key=jax.random.PRNGKey(1),
                       epochs=60, batch_size=8, validation_data=(x_val, y_val), progress=False,
                       early_stopping=train.EarlyStopping("val_loss", patience=3))
    h = result.history
    best = int(np.argmin(h["val_loss"]))
    assert result.best_epoch == best and result.epochs_run == min(best + 4, 60) or not np.isfinite(h["val_loss"]).all()
    np.testing.assert_allclose(train.evaluate(MODEL, LOSS, result.params, x_val, y_val)["loss"], h["val_loss"][best],
                               rtol=1e-5)


def test_early_stopping_on_accuracy_maximises():
    stop = train.EarlyStopping("val_accuracy")
    assert stop.better(0.9, 0.8) and not stop.better(0.7, 0.8)
    assert train.EarlyStopping("val_loss").better(0.1, 0.2)


def test_errors():
    x, y = _blobs()
    params = MODEL.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="no validation data"):
        train.fit(MODEL, LOSS, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(0), progress=False,
                  early_stopping=train.EarlyStopping("val_loss"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train.fit(MODEL, LOSS, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(0), progress=False,
                  num_classes=2)
    with pytest.raises(ValueError, match="same length"):
        train.fit(MODEL, LOSS, optim.sgd(0.1), params, x, y[:10], key=jax.random.PRNGKey(0), progress=False)


@pytest.mark.parametrize("loss, pred, target, expected", [
    (losses.CategoricalCrossEntropy(from_logits=True), [[2.0, 1.0], [0.0, 3.0]], [0, 0], 1),
    (losses.BinaryCrossEntropy(from_logits=True), [[0.3], [-0.2], [1.0]], [[1.0], [0.0], [0.0]], 2),
    (losses.BinaryCrossEntropy(), [[0.7], [0.2], [0.6]], [[1.0], [0.0], [0.0]], 2),
    (losses.Hinge(), [[0.3], [-0.2]], [[1.0], [1.0]], 1)])
def test_correct_count(loss, pred, target, expected):
    target = jnp.asarray(target)
    assert int(train.correct_count(jnp.asarray(pred), target, loss)) == expected


def test_diverging_run_stops_instead_of_training_on_nan():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    y = x.sum(axis=1, keepdims=True)
    model = nn.Dense(1)
    result = train.fit(model, losses.MSE(), optim.sgd(50.0), model.init(jax.random.PRNGKey(1), x), x, y,
                       key=jax.random.PRNGKey(2), epochs=200, batch_size=None, progress=False,
                       divergence_factor=None)  # NaN/inf alone (fit's run-away rule: test_bad_training_input)
    assert result.epochs_run < 200 and not np.isfinite(result.history["loss"][-1])


def test_fit_carries_batch_norm_state_and_dropout_keys_and_augments():
    from fbp import augment

    model = nn.Serial(nn.Conv2D(4, 3), nn.BatchNorm(momentum=0.5), nn.ReLU(), nn.Dropout(0.2), nn.GlobalAvgPool(),
                      nn.Dense(2))
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 5, 5, 1))
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(jnp.int32)
    params = model.init(jax.random.PRNGKey(1), x)
    seen = []

    def spy(key, xb):
        seen.append(xb.shape)
        return augment.gaussian_noise(0.01)(key, xb)

    result = train.fit(model, losses.CategoricalCrossEntropy(from_logits=True), optim.adam(0.01),
                       params, x, y, key=jax.random.PRNGKey(2), epochs=3, batch_size=8, progress=False,
                       validation_data=(x, y), augment=spy)
    assert result.state is not None and not np.allclose(result.state[1]["mean"], 0.0)
    assert seen  # traced into the step
    ev = train.evaluate(model, losses.CategoricalCrossEntropy(from_logits=True), result.params, x, y,
                        state=result.state)
    np.testing.assert_allclose(ev["loss"], result.history["val_loss"][-1], rtol=1e-5)
    step = train.make_step(model, losses.CategoricalCrossEntropy(from_logits=True), optim.sgd(0.1), has_state=True)
    p2, s2, _, value = step(params, model.init_state(params), optim.sgd(0.1).init(params), x, y,
                            key=jax.random.PRNGKey(0))
    assert jnp.isfinite(value) and s2[1]["var"].shape == (4,)


def test_metrics_records_exactly_the_names_asked_for():
    x, y = _blobs()
    split = (x[:30], y[:30])
    default = _fit(epochs=2, validation_data=split)
    only_accuracy = _fit(epochs=2, validation_data=split, metrics=["accuracy"])
    only_loss = _fit(epochs=2, validation_data=split, metrics=["loss"])
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(default.history)
    assert {"accuracy", "val_accuracy"} <= set(only_accuracy.history)
    assert not {"loss", "val_loss"} & set(only_accuracy.history)
    assert {"loss", "val_loss"} <= set(only_loss.history) and not {"accuracy", "val_accuracy"} & set(only_loss.history)
    # what is recorded is the same number either way
    np.testing.assert_array_equal(only_accuracy.history["accuracy"], default.history["accuracy"])
    np.testing.assert_array_equal(only_loss.history["val_loss"], default.history["val_loss"])
    with pytest.raises(ValueError, match="records only"):
        _fit(epochs=2, validation_data=split, metrics=["accuracy"], early_stopping=train.EarlyStopping("val_loss"))


def test_a_loss_declares_how_predictions_are_counted():
    pred = jnp.array([[-0.2], [0.3], [0.7]])
    assert int(train.correct_count(pred, jnp.array([[0.0], [1.0], [1.0]]), losses.BinaryCrossEntropy())) == 2
    assert int(train.correct_count(pred, jnp.array([[0.0], [1.0], [1.0]]),
                                   losses.BinaryCrossEntropy(from_logits=True))) == 3
    assert int(train.correct_count(pred, jnp.array([[-1.0], [1.0], [1.0]]), losses.Hinge())) == 3

    class Shifted(losses.MSE):  # a user's loss: positive above 0.5 by declaration, labels above 0.6
        score_threshold = 0.5
        label_threshold = 0.6

    labels = jnp.array([[0.0], [0.55], [1.0]])
    assert int(train.correct_count(pred, labels, Shifted())) == 3
    assert int(train.correct_count(pred, labels, losses.MSE())) == 2  # the defaults: 0.5 and 0.5
