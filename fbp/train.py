"""Training: the jitted step, the fit loop, early stopping, metrics, progress.

The cycle of backpropagation — forward, loss, backward, update, iterate — as a library::

    step = fbp.train.make_step(model, loss, optimizer)          # jitted
    params, opt_state, value = step(params, opt_state, x, y)

    result = fbp.train.fit(model, loss, optimizer, params, x, y, key=key, epochs=30,
                           batch_size=32, validation_split=0.1,
                           early_stopping=fbp.train.EarlyStopping("val_loss", patience=5))
    result.params, result.history["val_accuracy"]

**Gradient-descent variants are one knob**, ``batch_size``: ``None`` = batch gradient descent
(the whole data set per update), ``1`` = stochastic, ``N`` = mini-batch. Examples are
reshuffled every epoch with ``fold_in(key, epoch)``, so a run is reproducible from its key.
With ``scan_epochs=True`` each epoch's full batches run inside one ``lax.scan`` (one dispatch
per epoch instead of one per step — much faster for small models); the numbers are the same.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp import data as fdata
from fbp import debug as fdebug
from fbp import losses as flosses
from fbp import preflight
from fbp import privacy as fprivacy
from fbp import telemetry as ftelemetry
from fbp.core import Layer, Loss, require_state, require_state_mode, value_grad_and_output
from fbp.optim import GradientTransformation, apply_updates
from fbp.optim import learning_rate as read_learning_rate
from fbp.stopping import MODES, EarlyStopping  # noqa: F401  (fbp.train.EarlyStopping is the public name)

PyTree = Any


# --------------------------------------------------------------------------- metrics
def correct_count(pred, target, loss: Loss, where=None) -> jax.Array:
    """How many predictions are right: argmax over classes, or a threshold for one output.

    The threshold is 0 for logits and hinge scores, 0.5 for probabilities; hinge labels are ±1.
    ``where`` (``(B,)`` booleans) counts only those examples.
    """
    if pred.ndim >= 2 and pred.shape[-1] > 1:
        labels = target if jnp.issubdtype(target.dtype, jnp.integer) else jnp.argmax(target, axis=-1)
        right = jnp.argmax(pred, axis=-1) == labels
    else:
        logits = getattr(loss, "from_logits", False) or isinstance(loss, flosses.Hinge)
        right = (pred > (0.0 if logits else 0.5)) == (target > (0.0 if isinstance(loss, flosses.Hinge) else 0.5))
    if where is not None:
        right = right & where.reshape(where.shape + (1,) * (right.ndim - 1))
    return jnp.sum(right)


def evaluate(model: Layer, loss: Loss, params: PyTree, x, y, *, state: PyTree = None) -> dict[str, float]:
    """``{"loss": ..., "accuracy": ...}`` in evaluation mode (accuracy for classification losses)."""
    pred = jax.jit(lambda p, s, xx: model.apply(p, xx, state=s))(params, state, jnp.asarray(x))
    out = {"loss": float(loss(pred, jnp.asarray(y)))}
    if getattr(loss, "classification", False):
        out["accuracy"] = float(correct_count(pred, jnp.asarray(y), loss)) / _examples_from(y, loss)
    return out


# --------------------------------------------------------------------------- the step
def make_step(model: Layer, loss: Loss, optimizer: GradientTransformation, *, jit: bool = True,
              has_state: bool = False) -> Callable:
    """``step(params, opt_state, x, y, *, key=None) -> (params, opt_state, loss_value)``, jitted
    by default; ``key`` only for models with random layers. With ``has_state=True``:
    ``step(params, state, opt_state, x, y, *, key=None) -> (params, state, opt_state, loss_value)``
    (a model that keeps state must use it: its new state would otherwise be lost)."""
    require_state_mode(model, has_state, "fbp.train.make_step")

    def step(params, opt_state, x, y, *, key=None):
        value, grads, _, _ = value_grad_and_output(model, loss, params, x, y, key=key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state, value

    def step_with_state(params, state, opt_state, x, y, *, key=None):
        require_state(model, state, "fbp.train.make_step")
        value, grads, _, state = value_grad_and_output(model, loss, params, x, y, state=state, key=key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return apply_updates(params, updates), state, opt_state, value

    chosen = step_with_state if has_state else step
    return jax.jit(chosen) if jit else chosen


def _indexed_step(model, loss, optimizer, augment=None, telemetry=False):
    """The step the fit loop runs: gathers its batch by index and accumulates, in the carry, the
    epoch's summed loss and correct count (no host round trip per step) and, with ``telemetry``,
    the summed per-layer statistics of :mod:`fbp.telemetry` from the same pass."""
    probed = ftelemetry.Instrumented.of(model, None, stats=_stat_names(telemetry)) if telemetry else None

    def step(carry, x, y, batches, row, epoch_key, step_number):
        params, state, opt_state, loss_sum, correct, stat_sum = carry
        idx = batches[row]
        xb, yb = x[idx], y[idx]
        step_key = jax.random.fold_in(epoch_key, step_number)
        if augment is not None:
            xb = augment(jax.random.fold_in(step_key, 1), xb)
        key = step_key if model.needs_key else None
        if probed is None:
            value, grads, pred, state = value_grad_and_output(model, loss, params, xb, yb, state=state, key=key)
        else:
            value, grads, pred, state, stats = probed.run(loss, params, xb, yb, state=state, key=key)
            stat_sum = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), stat_sum, stats)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        per_batch = idx.shape[0] if loss.reduction == "mean" else 1  # "sum" already adds the examples up
        loss_sum = loss_sum + value.astype(jnp.float32) * per_batch
        correct = correct + correct_count(pred, yb, loss).astype(jnp.int32)
        return apply_updates(params, updates), state, opt_state, loss_sum, correct, stat_sum

    return step


# --------------------------------------------------------------------------- the result
class FitResult(NamedTuple):
    """What :func:`fit` returns; ``history`` maps metric names to one value per epoch run;
    ``state`` is the model's state (None for stateless models).

    ``stop_reason`` says why training ended: ``"completed N epochs"``, ``"early stopping: ..."``
    or ``"non-finite: ..."`` (which metric turned NaN/inf, at which epoch; then ``params``,
    ``opt_state`` and ``state`` are those of the last epoch that ended finite, or the best
    epoch's under early stopping, and ``diverged`` is True).

    ``telemetry`` (``fit(..., telemetry=True)``): ``{path: {stat: array over epochs}}`` with
    :mod:`fbp.telemetry`'s statistics, each the mean over the epoch's steps (``nonfinite``: the
    sum); plot it with :func:`fbp.telemetry.plot_gradient_flow`.
    """

    params: PyTree
    opt_state: PyTree
    history: dict[str, np.ndarray]
    best_epoch: int | None
    epochs_run: int
    state: PyTree = None
    stop_reason: str = ""
    telemetry: dict[str, dict[str, np.ndarray]] | None = None

    @property
    def diverged(self) -> bool:
        return self.stop_reason.startswith("non-finite")


def _progress(epochs: int, enabled: bool):
    if not enabled:
        return range(epochs), None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the examples extra
        return range(epochs), None
    bar = tqdm(range(epochs), unit="epoch", leave=True)
    return bar, bar


_all_finite = jax.jit(lambda tree: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf))
                                                        for leaf in jax.tree_util.tree_leaves(tree)
                                                        if jnp.issubdtype(leaf.dtype, jnp.inexact)] or [True])))


def _nonfinite_reason(record: dict[str, float], carry, epoch: int) -> str | None:
    for name in ("loss", "val_loss"):
        if name in record and not math.isfinite(record[name]):
            return f"non-finite: {name} is {record[name]} at epoch {epoch + 1}"
    if not bool(_all_finite(carry[:2])):
        return f"non-finite: parameters or model state hold NaN/inf after epoch {epoch + 1} (loss {record['loss']:.4g})"
    return None


# --------------------------------------------------------------------------- fit
def fit(model: Layer, loss: Loss, optimizer: GradientTransformation, params: PyTree, x, y, *, key,
        epochs: int = 10, batch_size: int | None = 32, validation_data: tuple | None = None,
        validation_split: float = 0.0, early_stopping: EarlyStopping | None = None, scan_epochs: bool = False,
        progress: bool = True, opt_state: PyTree = None, state: PyTree = None, num_classes: int | None = None,
        shuffle: bool = True, log_every: int = 0, metrics: Sequence[str] | None = None,
        augment: Callable | None = None, telemetry: bool | Sequence[str] = False,
        privacy: fprivacy.DPSGD | None = None) -> FitResult:
    """Train ``params`` on ``(x, y)`` for ``epochs`` epochs; deterministic given ``key``.

    Args:
        batch_size: ``None`` = batch GD, ``1`` = stochastic, ``N`` = mini-batches of ``N``.
        validation_data: ``(x_val, y_val)``; or ``validation_split`` holds out that fraction of
            ``(x, y)`` (chosen with ``key``).
        early_stopping: an :class:`EarlyStopping`; needs validation data for ``val_*`` monitors.
        scan_epochs: run each epoch's full batches inside one ``lax.scan``.
        state: the model's state (BatchNorm); default ``model.init_state(params)`` for models
            that keep state. Random layers get ``fold_in(epoch key, step)``: a fresh key per step.
        progress: show a tqdm bar (when tqdm is installed).
        num_classes: if given, integer labels are checked to lie in ``[0, num_classes)``
            (they are always checked against the model's output width).
        log_every: print a line every this many epochs (0: never).
        augment: ``fn(key, x_batch) -> x_batch`` (see :mod:`fbp.augment`), applied to every
            training batch with a fresh key; never to validation data.
        metrics: names to record, from ``["loss", "accuracy"]``; default ``loss`` plus
            ``accuracy`` for classification losses (validation metrics follow).
        telemetry: record per-layer statistics from every step's own pass (:mod:`fbp.telemetry`)
            in ``result.telemetry``: ``True`` for all of them, or a list of names.
        privacy: train with DP-SGD (:class:`fbp.privacy.DPSGD`): per-example clipping in one
            backward pass, Gaussian noise, Poisson sampling with expected batch ``batch_size``;
            the history gains ``epsilon`` (at the spec's ``delta``) after every epoch.

    Before the first step every argument, the targets (against the model's output and the
    loss's conventions) and the validation data are checked, so nothing fails after an epoch
    has trained. If the loss, the validation loss, the parameters or the model state turn
    NaN/inf, training stops with a ``RuntimeWarning``; the result then holds the last finite
    epoch's params (the best epoch's under early stopping) and says why in ``stop_reason``, and
    fit prints where the first NaN/inf appeared (:func:`fbp.debug.find_nonfinite`, run on the
    step of that epoch where the loss first turned non-finite).

    Returns:
        :class:`FitResult` with the final (or best, with early stopping) params and a history
        of ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate`` and
        ``seconds`` per epoch, as NumPy arrays, and ``stop_reason``. ``loss`` and ``val_loss``
        are means per example for ``reduction="mean"`` and ``"sum"`` alike.
    """
    preflight.check_arguments(loss, key, epochs, batch_size, validation_split, log_every, metrics)
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(f"fit: early_stopping must be an fbp.train.EarlyStopping, got {type(early_stopping).__name__}")
    fdata.validate(x, y, num_classes=num_classes, name="training data")
    if np.shape(x)[0] == 0:
        raise ValueError("fit: the training data is empty")
    if validation_data is None and validation_split:
        x, y, x_val, y_val = fdata.train_test_split(x, y, validation_split, key=jax.random.fold_in(key, 2**31 - 1))
        validation_data = (x_val, y_val)
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("fit: validation_data must be a pair (x_val, y_val)")
        fdata.validate(*validation_data, num_classes=num_classes, name="validation data")
    n = int(np.shape(x)[0])
    classify = getattr(loss, "classification", False) if metrics is None else "accuracy" in metrics
    if early_stopping is not None:
        recorded = preflight.recorded_metrics(classify, validation_data is not None)
        preflight.check_monitor(early_stopping.monitor, recorded, classify)
    if model.has_state and state is None:
        state = model.init_state(params)
    preflight.check_data(model, loss, params, state, x, y, *(validation_data or (None, None)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    opt_state = optimizer.init(params) if opt_state is None else opt_state

    if not isinstance(telemetry, bool):
        if isinstance(telemetry, str) or not isinstance(telemetry, Sequence):
            raise TypeError(f"fit: telemetry must be True, False or a list of statistic names from "
                            f"{ftelemetry.STATS}, got {telemetry!r}")
        ftelemetry.Instrumented.of(model, None, stats=telemetry)  # names checked before training
        telemetry = tuple(telemetry)
    private = None
    if privacy is not None:
        private = _private_setting(privacy, batch_size, telemetry, n)
    step_jit, scan_jit, evaluate_jit = _compiled(model, loss, optimizer, augment, telemetry, private)
    zero_stats = ftelemetry.zero_stats(model, loss, params, state, x, y, batch_size, _stat_names(telemetry)) \
        if telemetry else ({"examples": jnp.zeros((), jnp.float32)} if privacy is not None else {})
    if validation_data is not None:
        x_val, y_val = jnp.asarray(validation_data[0]), jnp.asarray(validation_data[1])

    history: dict[str, list[float]] = {}
    stat_history: dict[str, dict[str, list[float]]] = {}
    best, best_epoch, best_params, best_state, waited = None, None, params, state, 0
    epoch_range, bar = _progress(epochs, progress)
    carry = (params, state, opt_state)
    good = carry  # the last carry that ended an epoch with everything finite
    epochs_run, stop_reason = 0, f"completed {epochs} epochs"
    for epoch in epoch_range:
        start = time.perf_counter()
        full, rest = _epoch_batches(n, batch_size, jax.random.fold_in(key, epoch) if shuffle else None)
        if privacy is not None:  # Poisson batches are drawn inside the step; fixed ones drop the rest
            full, rest = (jnp.zeros((n // batch_size, 1), jnp.int32) if privacy.sampling == "poisson" else full), None
        epoch_key = jax.random.fold_in(jax.random.fold_in(key, 2**30), epoch)  # dropout etc.
        start_carry = carry = (*carry[:3], jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), zero_stats)
        if scan_epochs and full.shape[0] > 1:
            carry = scan_jit(carry, x, y, full, epoch_key)
        else:
            for i in range(full.shape[0]):
                carry = step_jit(carry, x, y, full, i, epoch_key, i)
        if rest is not None:
            carry = step_jit(carry, x, y, rest, 0, epoch_key, full.shape[0])
        loss_sum, correct = float(carry[3]), float(carry[4])
        seen = float(carry[5]["examples"]) if privacy is not None else n  # Poisson: how many were drawn
        record = {"loss": loss_sum / max(seen, 1)}
        if classify:
            record["accuracy"] = correct / max(seen * _examples_from(y, loss) / n, 1)
        if privacy is not None:
            record["epsilon"] = privacy.epsilon(n, batch_size, (epoch + 1) * (n // batch_size))
        if validation_data is not None:
            v_loss, v_correct = evaluate_jit(carry[0], carry[1], x_val, y_val)
            record["val_loss"] = float(v_loss)
            if classify:
                record["val_accuracy"] = float(v_correct) / _examples_from(y_val, loss)
        try:
            record["learning_rate"] = float(read_learning_rate(carry[2]))
        except ValueError:
            pass
        record["seconds"] = time.perf_counter() - start
        for name, value in record.items():
            history.setdefault(name, []).append(value)
        if telemetry:
            ftelemetry.record_epoch(stat_history, carry[5], -(-n // (n if batch_size is None else batch_size)))
        epochs_run = epoch + 1
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k not in ("seconds", "learning_rate")})
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "seconds"))
        reason = _nonfinite_reason(record, carry, epoch)
        if reason is not None:  # diverged: stop rather than train on NaN, and keep what was finite
            stop_reason = reason
            kept = f"the best epoch's ({best_epoch + 1})" if early_stopping is not None and best_epoch is not None \
                and early_stopping.restore_best else (f"those after epoch {epoch}" if epoch else "the initial ones")
            warnings.warn(f"fit stopped: {reason}; the returned params are {kept}. Lower the learning rate, clip the "
                          f"gradients (optim.clip_by_global_norm), or check the data", RuntimeWarning, stacklevel=2)
            print(fdebug.replay_epoch(model, loss, step_jit, start_carry, x, y, full, rest, epoch_key))
            carry = good
            break
        good = carry[:3]
        if early_stopping is not None:
            value = record[early_stopping.monitor]
            if (best is None and math.isfinite(value)) or (best is not None and early_stopping.better(value, best)):
                best, best_epoch, best_params, best_state, waited = value, epoch, carry[0], carry[1], 0
            else:
                waited += 1
                if waited >= early_stopping.patience:
                    stop_reason = (f"early stopping: {early_stopping.monitor} did not improve for "
                                   f"{early_stopping.patience} epochs (best epoch {best_epoch + 1})"
                                   if best_epoch is not None else
                                   f"early stopping: {early_stopping.monitor} was never finite")
                    break
    if bar is not None:
        bar.close()
    restore = early_stopping is not None and early_stopping.restore_best and best_epoch is not None
    params, state = (best_params, best_state) if restore else carry[:2]
    telemetry_history = {path: {k: np.asarray(v) for k, v in stats.items()} for path, stats in stat_history.items()}
    return FitResult(params, carry[2], {k: np.asarray(v) for k, v in history.items()}, best_epoch, epochs_run,
                     state, stop_reason, telemetry_history if telemetry else None)


def _stat_names(telemetry):
    return None if telemetry is True else telemetry


def _epoch_batches(n: int, batch_size: int | None, key):
    """One epoch's indices as ``(full, rest)``: ``full`` is ``(num_full_batches, size)``,
    ``rest`` is ``(1, n mod size)`` or None — made with one reshape, no per-batch host work."""
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (the whole data set), got {batch_size}")
    order = jnp.arange(n) if key is None else jax.random.permutation(key, n)
    k = n // size
    full = order[:k * size].reshape(k, size)
    return full, (order[k * size:][None] if n % size else None)


def _private_setting(privacy, batch_size, telemetry, n):
    if not isinstance(privacy, fprivacy.DPSGD):
        raise TypeError(f"fit: privacy must be an fbp.privacy.DPSGD, got {type(privacy).__name__}")
    if batch_size is None or batch_size > n:
        raise ValueError(f"fit: DP-SGD needs an expected batch_size between 1 and the {n} training examples, "
                         f"got {batch_size}")
    if telemetry:
        raise ValueError("fit: telemetry and privacy cannot be combined (telemetry would read the unclipped pass)")
    return privacy, n, int(batch_size)


def _build(model, loss, optimizer, augment, telemetry=False, private=None):
    step = _indexed_step(model, loss, optimizer, augment, telemetry) if private is None else \
        fprivacy.private_step(model, loss, optimizer, *private, correct_count, augment)
    def scan_epoch(carry, x, y, batches, epoch_key):
        body = lambda c, i: (step(c, x, y, batches, i, epoch_key, i), None)
        return jax.lax.scan(body, carry, jnp.arange(batches.shape[0]))[0]

    return (jax.jit(step), jax.jit(scan_epoch),
            jax.jit(lambda p, s, xv, yv: _eval_stats(model, loss, p, s, xv, yv)))


_build_cached = functools.lru_cache(maxsize=32)(_build)


def _compiled(model, loss, optimizer, augment=None, telemetry=False, private=None):
    """The jitted epoch pieces, cached per (model, loss, optimizer, augment) so a second ``fit``
    with the same objects does not recompile (layers and losses are hashable frozen dataclasses)."""
    try:
        return _build_cached(model, loss, optimizer, augment, telemetry, private)
    except TypeError:  # an unhashable user layer: build afresh
        return _build(model, loss, optimizer, augment, telemetry, private)


def _eval_stats(model, loss, params, state, x, y):
    """The loss per example (whatever the loss's reduction, as the training history) and the
    correct count, in evaluation mode."""
    pred = model.apply(params, x, state=state)
    value = loss(pred, y)
    return (value / x.shape[0] if loss.reduction == "sum" else value), correct_count(pred, y, loss)


def _examples_from(y, loss) -> int:
    """Number of predictions accuracy is counted over, from the target's shape."""
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.integer) or isinstance(loss, (flosses.CategoricalCrossEntropy,
                                                                  flosses.MulticlassHinge)):
        return math.prod(y.shape if jnp.issubdtype(y.dtype, jnp.integer) else y.shape[:-1])
    return math.prod(y.shape)
