"""Hardening: no silent wrong result, and a clear error for every bad input (issue 9); training's own cases are in
test_bad_training_input.py.

Each test feeds one bad or unusual input and asserts either the exception type *and* that the
message names what a user must fix, or the specified behaviour (finite params, a stop reason, a
warning, a NaN instead of a silent number under jit). Sections follow the package's modules.
"""

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bad_input_common import BN_MODEL, CCE, KEY, MLP, PARAMS, CountingOptimizer, X, Y, _fit

import fbp
from fbp import check, data, losses, nn, optim, train
from fbp.__main__ import main as cli
from fbp.core import InputError


# --------------------------------------------------------------------------- 6. state thrown away
def test_stateless_transforms_refuse_a_model_with_state():
    with pytest.raises(InputError, match=r"has_state=True.*\['1'\].*init_state"):
        fbp.value_and_grad(BN_MODEL, CCE)
    with pytest.raises(InputError, match="has_state=True"):
        train.make_step(BN_MODEL, CCE, optim.sgd(0.1))
    params = BN_MODEL.init(KEY, X)
    with pytest.raises(InputError, match="needs the model's state.*received None"):
        fbp.value_and_grad(BN_MODEL, CCE, has_state=True)(params, None, X, Y % 2)
    with pytest.raises(InputError, match="needs the model's state"):
        step = train.make_step(BN_MODEL, CCE, optim.sgd(0.1), has_state=True)
        step(params, None, optim.sgd(0.1).init(params), X, Y % 2)


# --------------------------------------------------------------------------- 7. shapes and empty input
def test_apply_updates_never_broadcasts_or_drops_keys():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"at 'w' expected \(3,\).*received \(2, 3\)"):
        optim.apply_updates(params, {"w": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        optim.apply_updates(params, {"v": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['v'\]"):
        optim.apply_updates(params, {"w": jnp.ones(3), "v": jnp.ones(3)})


def test_empty_batch_raises():
    with pytest.raises(InputError, match="batch is empty"):
        fbp.value_and_grad(MLP, CCE)(PARAMS, X[:0], Y[:0])
    with pytest.raises(ValueError, match="empty"):
        _fit(x=X[:0], y=Y[:0])


def test_normalising_over_a_single_value_raises():
    params = BN_MODEL.init(KEY, X)
    with pytest.raises(InputError, match="more than one value per channel.*PyTorch"):
        fbp.value_and_grad(BN_MODEL, CCE, has_state=True)(params, BN_MODEL.init_state(params), X[:1], Y[:1] % 2)
    ln = nn.LayerNorm()
    with pytest.raises(InputError, match="single feature"):
        ln.apply(ln.init(KEY, X[:, :1]), X[:, :1])
    gn = nn.GroupNorm(num_groups=4)
    x4 = jnp.ones((2, 4))
    with pytest.raises(InputError, match="single value"):
        gn.apply(gn.init(KEY, x4), x4)


# --------------------------------------------------------------------------- 8. hyperparameters
@pytest.mark.parametrize("make, error, match", [
    (lambda: optim.sgd(float("inf")), ValueError, "learning_rate must be a finite number"),
    (lambda: optim.adam(float("nan")), ValueError, "learning_rate"),
    (lambda: optim.scale(float("nan")), ValueError, "step_size"),
    (lambda: optim.adam(1e-3, eps=0.0), ValueError, "0/0"),
    (lambda: optim.rmsprop(1e-3, eps=0.0), ValueError, "eps"),
    (lambda: optim.adamw(1e-3, weight_decay=float("inf")), ValueError, "weight_decay"),
    (lambda: optim.sgd(lambda step: jnp.nan * step), ValueError, "schedule gives nan at step 0"),
    (lambda: optim.sgd(optim.linear_schedule(0.1, -0.1, 100)), ValueError, "gives -0.1.* at step 100.*negative"),
    (lambda: optim.linear_schedule(float("nan"), 0.0, 10), ValueError, "init_value"),
    (lambda: optim.sgd("0.1"), TypeError, "learning_rate must be a number, got str"),
    (lambda: optim.clip_by_global_norm(float("nan")), ValueError, "max_norm"),
])
def test_hyperparameters_are_validated(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("make, match", [
    (lambda: nn.LeakyReLU(float("nan")), "negative_slope"), (lambda: nn.ELU(float("inf")), "alpha"),
    (lambda: nn.BatchNorm(epsilon=float("inf")), "epsilon"), (lambda: nn.Dropout(float("nan")), "rate"),
    (lambda: fbp.augment.gaussian_noise(float("nan")), "stddev"), (lambda: fbp.augment.random_crop(2.5), "padding"),
    (lambda: fbp.augment.horizontal_flip(float("nan")), "probability"),
    (lambda: data.batch_indices(10, 2.5), r"batch_size must be an int"),
])
def test_sibling_hyperparameters_of_layers_and_data_are_validated(make, match):
    with pytest.raises((TypeError, ValueError), match=match):  # TypeError: a fraction where an int belongs
        make()


def test_a_traced_learning_rate_is_accepted():  # hyperparameter sweeps under vmap
    def one(lr):
        opt = optim.sgd(lr)
        return opt.update({"w": jnp.ones(2)}, opt.init({"w": jnp.ones(2)}))[0]["w"]

    np.testing.assert_allclose(jax.vmap(one)(jnp.array([0.1, 0.2]))[:, 0], [-0.1, -0.2], rtol=1e-6)


# ----------------------------------------------------------------------- 9. a user's backward of the wrong structure
def _user_dense(backward_grads):
    def forward(p, x):
        return x @ p["w"] + p["b"], (x, p["w"])

    def backward(res, d_y):
        x, w = res
        return backward_grads(x, d_y), d_y @ w.T

    return fbp.layer(forward, backward, lambda k, x: {"w": jnp.ones((x.shape[-1], 3)), "b": jnp.zeros(3)},
                     name="MyDense")


@pytest.mark.parametrize("grads, match", [
    (lambda x, d: {"w": x.T @ d}, r"missing \['1/b'\]"),
    (lambda x, d: {"w": x.T @ d, "b": d.sum(0), "c": d.sum(0)}, r"unexpected \['1/c'\]"),
    (lambda x, d: {"w": x.T @ d, "b": d}, r"at '1/b' expected \(3,\) float32, received \(40, 3\)"),
])
def test_a_backward_whose_d_params_do_not_mirror_params_is_named(grads, match):
    model = nn.Serial(nn.Tanh(), _user_dense(grads))
    params = model.init(KEY, X)
    for f in (fbp.value_and_grad(model, CCE), jax.jit(fbp.value_and_grad(model, CCE))):
        with pytest.raises(InputError, match=r"MyDense\(\) at path '1': .*" + match):
            f(params, X, Y)


# --------------------------------------------------------------------------- 10. smaller cases
def test_check_refuses_half_precision_bad_tolerances_and_integer_dtypes():
    dense = nn.Dense(3)
    params = dense.init(KEY, X)
    with pytest.raises(ValueError, match="float16.*float64"):
        check.layer(dense, params, X, dtype=jnp.float16)
    with pytest.raises(ValueError, match="bfloat16"):
        check.model(MLP, CCE, jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), PARAMS),
                    X.astype(jnp.bfloat16), Y, dtype=None)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        check.layer(dense, params, X, rtol=-1.0)
    with pytest.raises(ValueError, match="fd_directions"):
        check.loss(CCE, X[:, :2], Y % 2, fd_directions=0)
    with pytest.raises(ValueError, match="dtype must be a floating dtype.*int32"):
        check.layer(dense, params, X, dtype=jnp.int32)
    with pytest.raises(InputError, match="floating-point.*int32"):  # the layer's own refusal comes through
        check.layer(dense, params, X.astype(jnp.int32))


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 2.5}, "batch_size must be an int"),
                                           ({"batch_size": 0}, "batch_size"), ({"epochs": -3}, "epochs"),
                                           ({"epochs": 0}, "epochs"), ({"validation_split": 1.5}, "validation_split"),
                                           ({"key": 0}, "random key"), ({"key": None}, "random key"),
                                           ({"metrics": ["acc"]}, "metrics")])
def test_fit_arguments_are_validated(kwargs, match):
    opt = CountingOptimizer()
    with pytest.raises((ValueError, TypeError), match=match):
        _fit(opt=opt(), **kwargs)
    assert opt.calls == 0


def test_losses_that_are_not_scalars_or_sums():
    per_example = losses.CategoricalCrossEntropy(from_logits=True, reduction="none")
    with pytest.raises(InputError, match="differentiates a scalar.*reduction='mean'"):
        fbp.value_and_grad(MLP, per_example)(PARAMS, X, Y)
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        _fit(loss=per_example)
    # "sum" trains on the summed objective, and the history still reads as a mean per example
    summed = _fit(loss=losses.CategoricalCrossEntropy(from_logits=True, reduction="sum"), opt=optim.sgd(0.0),
                  epochs=1, validation_data=(X, Y))
    value = float(CCE(MLP.apply(PARAMS, X), Y))
    np.testing.assert_allclose([summed.history["loss"][0], summed.history["val_loss"][0]], value, rtol=1e-5)


def test_fit_takes_a_users_own_loss_without_check_target():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class HalfSquares(fbp.Loss):  # subclasses the bare contract: no check_target, no classification flag
        def forward(self, pred, target):
            diff = pred - target
            return 0.5 * jnp.mean(jnp.sum(diff * diff, axis=-1)), diff

        def backward(self, res, g=1.0):
            return g * res / res.shape[0]

    y = jax.nn.one_hot(Y, 3)
    result = _fit(loss=HalfSquares(), y=y, epochs=2)
    assert result.stop_reason == "completed 2 epochs" and "accuracy" not in result.history
    with pytest.raises(TypeError):  # a wrong target shape fails before training, inside the user's own forward
        _fit(loss=HalfSquares(), y=y[:, :2], epochs=1)


def test_embedding_ids_out_of_range():
    emb = nn.Embedding(5, 3)
    params = emb.init(KEY, jnp.zeros(2, jnp.int32))
    for ids in (jnp.array([1, 7]), jnp.array([1, -1])):
        with pytest.raises(InputError, match=r"ids must lie in \[0, 5\); found (7|-1) at index \(1,\)"):
            emb.apply(params, ids)
    ids = jnp.array([1, 7, -1, 4])
    y = np.asarray(jax.jit(emb.apply)(params, ids))  # under jit: a NaN row, not the clamped last row
    assert np.isfinite(y[[0, 3]]).all() and np.isnan(y[[1, 2]]).all()
    d_table = jax.jit(lambda p, i: emb.backward(emb.forward(p, i)[1], jnp.ones((4, 3)))[0]["table"])(params, ids)
    np.testing.assert_array_equal(d_table.sum(axis=1), [0, 3, 0, 0, 3])  # the bad ids add nothing, anywhere


# --------------------------------------------------------------------------- tracebacks that named nothing of ours
def test_validation_split_that_leaves_nothing_to_train_on():
    with pytest.raises(ValueError, match="leaves no examples to train on"):
        _fit(validation_split=0.99)


def test_batch_norm_state_from_another_width():
    params = BN_MODEL.init(KEY, X)
    other = nn.Serial(nn.Dense(6), nn.BatchNorm(), nn.ReLU(), nn.Dense(2))
    state = other.init_state(other.init(KEY, X))
    with pytest.raises(InputError, match=r"BatchNorm.* at path '1': state 'mean' must have shape \(4,\).*\(6,\)"):
        BN_MODEL.apply(params, X, state=state)


def test_optimizer_state_from_another_optimizer_or_params_tree():
    adam = optim.adam(1e-3)
    with pytest.raises(ValueError, match="scale_by_adam: the optimizer state does not match.*opt.init"):
        adam.update(PARAMS, optim.sgd(0.1).init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="chain of 2 transformations.*tuple of 2"):
        adam.update(PARAMS, optim.sgd(0.1, momentum=0.9).init(PARAMS)[0], PARAMS)
    other = nn.Serial(nn.Dense(5), nn.Tanh(), nn.Dense(3)).init(KEY, X)
    with pytest.raises(ValueError, match=r"at 'mu/0/b' expected \(8,\).*\(5,\)"):
        jax.jit(adam.update)(PARAMS, adam.init(other), PARAMS)


def test_params_as_a_list_or_of_another_combinator():
    with pytest.raises(InputError, match=r"received a list; convert it with tuple\(params\)"):
        fbp.value_and_grad(MLP, CCE)(list(PARAMS), X, Y)
    residual = nn.Residual(nn.Dense(2))
    with pytest.raises(InputError, match=r"Residual.*params as a dict with keys \['block'\]"):
        residual.apply({"projection": {}}, X)
    parallel = nn.Parallel(nn.Dense(2), nn.Dense(3))
    with pytest.raises(InputError, match="one entry per branch"):
        parallel.apply((PARAMS[0],), X)


def test_a_single_unbatched_example():
    with pytest.raises(InputError, match=r"batch axis.*\(3,\).*x\[None\]"):
        fbp.value_and_grad(MLP, CCE)(PARAMS, X[0], Y[0])


def test_float_padding_mask():
    mha = nn.MultiHeadAttention(2)
    x = jnp.ones((2, 3, 4))
    params = mha.init(KEY, x)
    with pytest.raises(InputError, match=r"mask must be \(batch, time\) = \(2, 3\) booleans.*float32.*mask > 0"):
        mha.apply(params, (x, jnp.ones((2, 3))))
    assert "function" not in repr(mha)  # error owners print no addresses


def test_pullback_with_a_wrong_d_y():
    y, pullback = fbp.vjp(MLP, PARAMS, X)
    with pytest.raises(InputError, match=r"d_y shaped like the output y \(40, 3\) float32, received \(40, 2\)"):
        pullback(jnp.ones((40, 2)))
    with pytest.raises(InputError, match="received \\(40, 3\\) int32"):
        pullback(jnp.ones((40, 3), jnp.int32))


def test_check_reports_a_wrong_shape_or_missing_leaf_as_a_failure():
    for grads, worst in ((lambda x, d: {"w": jnp.zeros(1), "b": d.sum(0)}, "shape (1,) vs (2, 3)"),
                         (lambda x, d: {"w": None, "b": d.sum(0)}, "fbp returned None")):
        layer = _user_dense(grads)
        report = check.layer(layer, layer.init(KEY, X), X)
        assert not report.ok and [row.worst for row in report.failures] == [worst]
        assert "w" in str(report) and "FAIL" in str(report)


def test_dropout_needs_a_real_key():
    drop = nn.Dropout(0.5)
    with pytest.raises(InputError, match="random key.*received 0"):
        drop.apply({}, X, key=0, train=True)
    with pytest.raises(InputError, match="needs a random key"):
        drop.apply({}, X, key=None, train=True)


def test_cli_refuses_bad_values_before_training(tmp_path, capsys):
    for argv in (["--hidden", "-5"], ["--lr", "-1"], ["--lr", "nan"], ["--batch-size", "-3"], ["--epochs", "0"],
                 ["--plot", str(tmp_path / "missing" / "curves.png")]):
        with pytest.raises(SystemExit) as exc:
            cli(["train", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "usage:" in err and argv[0] in err


def test_read_idx_names_a_corrupt_or_truncated_gzip(tmp_path):
    raw = b"\x00\x00\x08\x01" + struct.pack(">i", 50) + bytes(range(50))
    packed = gzip.compress(raw)
    truncated, corrupt = tmp_path / "truncated-idx1-ubyte.gz", tmp_path / "corrupt-idx1-ubyte.gz"
    truncated.write_bytes(packed[: len(packed) // 2])
    corrupt.write_bytes(b"\x1f\x8b" + bytes(40))
    for path in (truncated, corrupt):
        with pytest.raises(ValueError, match=f"{path.name}: corrupt or truncated gzip"):
            data.read_idx(path)


def test_wrong_width_validation_data_is_refused_before_training():
    opt = CountingOptimizer()
    with pytest.raises(ValueError, match=r"validation features have shape \(4, 5\), training features \(40, 2\)"):
        _fit(opt=opt(), validation_data=(jnp.ones((4, 5)), Y[:4]))
    assert opt.calls == 0
