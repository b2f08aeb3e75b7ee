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

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fbp import checkpoint as fcheckpoint
from fbp import data as fdata
from fbp import debug as fdebug
from fbp import parallel, preflight
from fbp import privacy as fprivacy
from fbp import resume as fresume
from fbp import telemetry as ftelemetry
from fbp.core import Layer, Loss, require_number
from fbp.diagnostics import record as fdiag_record
from fbp.optim import learning_rate as read_learning_rate
from fbp.steps import (
    EpochCarry,
    compiled_epoch,
    correct_count,
    epoch_batches,
    evaluate,
    examples_counted,
    make_step,
    telemetry_stats,
)
from fbp.stopping import MODES, EarlyStopping  # noqa: F401  (fbp.train.EarlyStopping is the public name)

__all__ = ["EarlyStopping", "FitResult", "correct_count", "evaluate", "fit", "make_step"]

PyTree = Any


# --------------------------------------------------------------------------- the result
class FitResult(NamedTuple):
    """What ``fit`` returns; ``history`` maps metric names to one value per epoch run;
    ``state`` is the model's state (None for stateless models).

    ``stop_reason`` says why training ended: ``"completed N epochs"``, ``"early stopping: ..."``,
    ``"non-finite: ..."`` (which metric turned NaN/inf, at which epoch) or ``"diverged: ..."``
    (the training loss grew past ``divergence_factor`` times its lowest value and above its
    value before training). After either of the last two, ``diverged`` is True, ``diverged_at``
    is the (1-based) epoch it was found at, and ``params``, ``opt_state`` and ``state`` are those
    of the epoch before (the best epoch's under early stopping).

    ``telemetry`` (``fit(..., telemetry=True)``): ``{path: {stat: array over epochs}}`` with
    ``fbp.telemetry``'s statistics, each the mean over the epoch's steps (``nonfinite``: the
    sum); plot it with ``fbp.telemetry.plot_gradient_flow``.

    ``diagnostics`` (``fit(..., diagnostics=...)``): ``{step: {quantity: value or {path: value}}}``
    (``fbp.diagnostics``); α of a step arrives with the next one.
    """

    params: PyTree
    opt_state: PyTree
    history: dict[str, np.ndarray]
    best_epoch: int | None
    epochs_run: int
    state: PyTree = None
    stop_reason: str = ""
    telemetry: dict[str, dict[str, np.ndarray]] | None = None
    diverged_at: int | None = None
    diagnostics: dict[int, dict] | None = None

    @property
    def diverged(self) -> bool:
        return self.stop_reason.startswith(("non-finite", "diverged"))


def _progress(first: int, epochs: int, enabled: bool):
    if not enabled:
        return range(first, epochs), None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the examples extra
        return range(first, epochs), None
    bar = tqdm(range(first, epochs), unit="epoch", leave=True, initial=first, total=epochs)
    return bar, bar


_all_finite = jax.jit(lambda tree: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf))
                                                        for leaf in jax.tree_util.tree_leaves(tree)
                                                        if jnp.issubdtype(leaf.dtype, jnp.inexact)] or [True])))


def _nonfinite_reason(record: dict[str, float], carry: EpochCarry, epoch: int) -> str | None:
    for name in ("loss", "val_loss"):
        if name in record and not math.isfinite(record[name]):
            return f"non-finite: {name} is {record[name]} at epoch {epoch + 1}"
    if not bool(_all_finite((carry.params, carry.state))):
        return f"non-finite: parameters or model state hold NaN/inf after epoch {epoch + 1} (loss {record['loss']:.4g})"
    return None


# --------------------------------------------------------------------------- fit
def fit(model: Layer, loss: Loss, optimizer, params: PyTree, x, y, *, key,
        epochs: int = 10, batch_size: int | None = 32, validation_data: tuple | None = None,
        validation_split: float = 0.0, early_stopping: EarlyStopping | None = None, scan_epochs: bool = False,
        progress: bool = True, opt_state: PyTree = None, state: PyTree = None, num_classes: int | None = None,
        shuffle: bool = True, log_every: int = 0, metrics: Sequence[str] | None = None,
        augment: Callable | None = None, telemetry: bool | Sequence[str] = False,
        privacy: fprivacy.DPSGD | None = None, checkpoint_dir=None, checkpoint_every: int = 1,
        resume: bool = False, keep_checkpoints: int | None = 3, mesh=None, precision=None,
        divergence_factor: float | None = 1e3, diagnostics=None, diagnostics_every: int = 1) -> FitResult:
    """Train ``params`` on ``(x, y)`` for ``epochs`` epochs; deterministic given ``key``.

    Args:
        model: the network (a layer).
        loss: a mean- or sum-reduced loss; what it declares (``classification``) decides the metrics.
        optimizer: a ``fbp.optim`` gradient transformation, or a ``fbp.kfac.KFAC`` (its
            factors come from each step's own pass; not with ``privacy`` or ``precision``).
        params: the initial parameters (``model.init(key, x)``).
        x: the training features, ``(N, ...)``.
        y: the training targets, ``(N, ...)``, checked against the loss's conventions.
        key: the run's random key: shuffling, the validation split, dropout and augmentation keys
            all derive from it, so a run is reproducible from it.
        epochs: how many epochs to train (a resumed run continues to this count).
        batch_size: ``None`` = batch GD, ``1`` = stochastic, ``N`` = mini-batches of ``N``.
        validation_data: ``(x_val, y_val)``, evaluated after every epoch.
        validation_split: or hold out this fraction of ``(x, y)`` (chosen with ``key``).
        early_stopping: an ``EarlyStopping``; needs validation data for ``val_*`` monitors.
        scan_epochs: run each epoch's full batches inside one ``lax.scan``.
        state: the model's state (BatchNorm); default ``model.init_state(params)`` for models
            that keep state. Random layers get ``fold_in(epoch key, step)``: a fresh key per step.
        progress: show a tqdm bar (when tqdm is installed).
        num_classes: if given, integer labels are checked to lie in ``[0, num_classes)``
            (they are always checked against the model's output width).
        opt_state: the optimizer state to start from (default ``optimizer.init(params)``).
        shuffle: reshuffle the examples every epoch (``fold_in(key, epoch)``).
        log_every: print a line every this many epochs (0: never).
        augment: ``fn(key, x_batch) -> x_batch`` (see ``fbp.augment``), applied to every
            training batch with a fresh key; never to validation data.
        metrics: names to record in the history, from ``["loss", "accuracy"]``; default
            ``loss`` plus ``accuracy`` for losses that declare ``classification``. Validation
            metrics follow (``val_loss`` with ``loss``, ``val_accuracy`` with ``accuracy``). The
            loss is measured either way: divergence is judged on it.
        telemetry: record per-layer statistics from every step's own pass (``fbp.telemetry``)
            in ``result.telemetry``: ``True`` for all of them, or a list of names. Under
            ``precision`` they are those of the low-precision pass; under ``privacy`` those of
            the clipped pass (two passes per step; a warning says they are not private).
        privacy: train with DP-SGD (``fbp.privacy.DPSGD``): per-example clipping in one
            backward pass, Gaussian noise, Poisson sampling with expected batch ``batch_size``;
            the history gains ``epsilon`` (at the spec's ``delta``) after every epoch.
        checkpoint_dir: save the whole run (``fbp.resume``: params, optimizer and model
            state, history, early-stopping state) there every ``checkpoint_every`` epochs, at
            the last epoch and when training stops early, keeping the newest
            ``keep_checkpoints`` (``fbp.checkpoint``: pickle-free, checksummed, atomic).
            A directory that already holds checkpoints is refused unless ``resume``; one that
            is a file or cannot be written is refused before training.
        checkpoint_every: save every this many epochs (and at the end).
        keep_checkpoints: how many of the newest checkpoints to keep (``None``: all).
        mesh: data parallel over a ``fbp.parallel.data_mesh``: every batch is split over the
            mesh's devices, params and optimizer and model state are replicated; the numbers
            are those of one device (global BatchNorm statistics, the same dropout masks).
            ``batch_size`` must be a multiple of the device count, and the last, smaller
            batch of an epoch (``n mod batch_size`` examples) is dropped. With ``privacy`` the
            Poisson buffer is rounded up to a multiple of the device count (fixed sampling:
            ``batch_size`` must be one); the noise is the same, so the run equals one device's
            to float rounding.
        precision: mixed precision (``fbp.precision``): a ``Policy`` or its text
            (``"bfloat16"``); pair float16 with a ``precision.loss_scaled`` optimizer.
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (start afresh if there
            is none). Give the same arguments and ``key``: the resumed run ends bit-identical
            to one that was never interrupted. ``epochs`` may be raised to train longer; a
            changed data set size, batch size, validation set, optimizer setting (learning
            rate, ...), telemetry, privacy or precision is refused (``fbp.resume``).
        divergence_factor: stop as diverged when an epoch's training loss is finite but above
            both its value before training (the first step's batch) and this many times its
            lowest value so far; ``None`` judges divergence by NaN/inf alone.
        diagnostics: ``"economy"``, ``"business"``, ``"full"`` or a list of names and extensions
            (``fbp.diagnostics``), computed inside the jitted step, in ``result.diagnostics`` and
            in ``diagnostics.jsonl`` beside the checkpoints.
        diagnostics_every: compute them every this many steps (the plain pass in between).

    Before the first step every argument, the targets (against the model's output and the
    loss's conventions) and the validation data are checked, so nothing fails after an epoch
    has trained. If the loss, the validation loss, the parameters or the model state turn
    NaN/inf, or the loss runs away (``divergence_factor``), training stops with a
    ``RuntimeWarning``; the result then holds the last good epoch's params (the best epoch's
    under early stopping) and says why in ``stop_reason`` and ``diverged_at``; on NaN/inf fit
    prints where the first one appeared (``fbp.debug.find_nonfinite``, run on the step of that
    epoch where the loss first turned non-finite).

    Returns:
        ``FitResult`` with the final (or best, with early stopping) params and a history
        of ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ``learning_rate`` and
        ``seconds`` per epoch, as NumPy arrays, and ``stop_reason``. ``loss`` and ``val_loss``
        are means per example for ``reduction="mean"`` and ``"sum"`` alike.
    """
    preflight.check_arguments(loss, key, epochs, batch_size, validation_split, log_every, metrics)
    preflight.check_checkpointing(checkpoint_dir, checkpoint_every, resume, keep_checkpoints)
    if divergence_factor is not None:
        require_number("fit", "divergence_factor", divergence_factor, low=1, low_open=True)
    if checkpoint_dir is not None:  # a file or a read-only path is refused now, not after the first epoch
        fcheckpoint.check_directory(checkpoint_dir)
    if early_stopping is not None and not isinstance(early_stopping, EarlyStopping):
        raise TypeError(f"fit: early_stopping must be an fbp.train.EarlyStopping, got {type(early_stopping).__name__}")
    fdata.validate(x, y, num_classes=num_classes, name="training data")
    if np.shape(x)[0] == 0:
        raise ValueError("fit: the training data is empty")
    if validation_data is None and validation_split:
        x, y, x_val, y_val = fdata.train_test_split(x, y, validation_split,
                                                    key=jax.random.fold_in(key, VALIDATION_SPLIT_KEY))
        validation_data = (x_val, y_val)
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("fit: validation_data must be a pair (x_val, y_val)")
        fdata.validate(*validation_data, num_classes=num_classes, name="validation data")
    n = int(np.shape(x)[0])
    names = _Recorded.of(loss, metrics)
    if early_stopping is not None:
        recorded = preflight.recorded_metrics(names.accuracy, validation_data is not None, names.loss)
        preflight.check_monitor(early_stopping.monitor, recorded, names.accuracy)
    if model.has_state and state is None:
        state = model.init_state(params)
    preflight.check_data(model, loss, params, state, x, y, *(validation_data or (None, None)))
    x, y = jnp.asarray(x), jnp.asarray(y)
    optimizer = preflight.optimizer_setting(optimizer, x, y, privacy)
    opt_state = optimizer.init(params) if opt_state is None else opt_state
    telemetry = preflight.telemetry_setting(model, telemetry)
    watched, opt_state = preflight.diagnostics_setting(diagnostics, diagnostics_every, telemetry, privacy, precision,
                                                       optimizer, opt_state, params)
    private = None if privacy is None else preflight.private_setting(privacy, batch_size, telemetry, n)
    if precision is not None and privacy is not None:
        raise ValueError("fit: precision cannot be combined with privacy: DP-SGD's guarantee rests on every example's "
                         "clipped gradient having norm at most l2_clip, and in a low-precision compute dtype the "
                         "per-example norms that set the clipping are off by its rounding (2^-8 relative for "
                         "bfloat16), so the bound would not hold. Train privately in float32 (precision=None)")
    if mesh is not None:
        x, y, params, state, opt_state = preflight.data_parallel_setting(mesh, privacy, batch_size, n, x, y, params,
                                                                         state, opt_state)
    step_jit, scan_jit, evaluate_jit = compiled_epoch(model, loss, optimizer, augment, telemetry, private, mesh,
                                                      precision, watched)
    zero_stats = ftelemetry.zero_stats(model, loss, params, state, x, y, batch_size, telemetry_stats(telemetry)) \
        if telemetry else {}
    if privacy is not None:  # the examples drawn, and the statistics of the clipped pass
        zero_stats = {"examples": jnp.zeros((), jnp.float32)} | ({"layers": zero_stats} if telemetry else {})
    x_val, y_val = (None, None) if validation_data is None else map(jnp.asarray, validation_data)
    if mesh is not None:  # everything the jitted pieces read, on the mesh's devices
        x_val, y_val, zero_stats = parallel.place((x_val, y_val, zero_stats), parallel.replicated(mesh))

    loop = fresume.LoopState.start(params, state, opt_state)
    run = None
    if checkpoint_dir is not None:
        run = fresume.signature(optimizer, params, n=n, batch_size=batch_size, shuffle=shuffle,
                                validation=None if x_val is None else int(x_val.shape[0]), telemetry=telemetry,
                                privacy=privacy, precision=precision, diagnostics=watched)
        loop = fresume.prepare(checkpoint_dir, loop, key, resume, run)
    diagnosed = {} if watched is None or checkpoint_dir is None else \
        fdiag_record.load(checkpoint_dir, int(loop.carry[2].count))
    epoch_range, bar = _progress(loop.epoch, epochs, progress and loop.stop_reason is None)
    for epoch in (epoch_range if loop.stop_reason is None else ()):
        start = time.perf_counter()
        full, rest = epoch_batches(n, batch_size, jax.random.fold_in(key, epoch) if shuffle else None)
        if privacy is not None:  # Poisson batches are drawn inside the step; fixed ones drop the rest
            full, rest = (jnp.zeros((n // batch_size, 1), jnp.int32) if privacy.sampling == "poisson" else full), None
        if mesh is not None:  # a batch the devices cannot share evenly is dropped
            rest = None
        epoch_key = jax.random.fold_in(jax.random.fold_in(key, STEP_KEYS), epoch)
        if watched is not None:  # the rows the epoch's steps write their diagnostics into
            zero_stats = fdiag_record.buffer_for(model, loss, optimizer, watched, loop.carry, x, y, full, rest, mesh)
        start_carry = EpochCarry.start(*loop.carry, zero_stats)
        carry = _run_epoch(step_jit, scan_jit, start_carry, x, y, full, rest, epoch_key, scan_epochs)
        measured = _measure_epoch(carry, names, loss, y, n, epoch, batch_size, privacy, evaluate_jit, x_val, y_val)
        record = names.select(measured) | {"seconds": time.perf_counter() - start}
        for name, value in record.items():
            loop.history.setdefault(name, []).append(value)
        if telemetry:
            ftelemetry.record_epoch(loop.stat_history, carry.stats["layers"] if privacy is not None else carry.stats,
                                    full.shape[0] + (rest is not None))
        if watched is not None:
            lines = fdiag_record.record_epoch(diagnosed, carry.stats, watched.every)
            if checkpoint_dir is not None:
                fdiag_record.append(checkpoint_dir, lines)
        loop.epoch = epoch + 1
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k not in ("seconds", "learning_rate")})
        if log_every and (epoch + 1) % log_every == 0:
            print(f"epoch {epoch + 1}: " + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "seconds"))
        if epoch == 0 and math.isfinite(float(carry.first_loss)):  # the loss before any update
            loop.divergence["initial"] = float(carry.first_loss)
        reason = _nonfinite_reason(measured, carry, epoch)
        grown = None if reason is not None else _growth_reason(loop.divergence, measured["loss"], epoch,
                                                               divergence_factor)
        if reason is not None:  # diverged: stop rather than train on NaN, and keep what was finite
            _stop_on_divergence(loop, reason, early_stopping, epoch)
            print(fdebug.replay_epoch(model, loss, step_jit, start_carry, x, y, full, rest, epoch_key))
        elif grown is not None:  # finite but running away: the same, without a NaN to localise
            _stop_on_divergence(loop, grown, early_stopping, epoch)
        else:
            lowest = loop.divergence["lowest"]
            if lowest is None or measured["loss"] < lowest:
                loop.divergence.update(lowest=measured["loss"], lowest_epoch=epoch)
            loop.carry = loop.good = carry.trees
            if early_stopping is not None:
                _early_stopping(early_stopping, loop, measured[early_stopping.monitor], epoch)
        if checkpoint_dir is not None and (loop.epoch % checkpoint_every == 0 or loop.epoch == epochs
                                           or loop.stop_reason is not None):
            fresume.save(checkpoint_dir, loop, key, keep_checkpoints, run)
        if loop.stop_reason is not None:
            break
    if bar is not None:
        bar.close()
    return _result(loop, early_stopping, telemetry)._replace(diagnostics=diagnosed if watched is not None else None)


# Keys fit derives from its ``key`` (fixed numbers: a run is reproducible from its key, and a
# resumed run ends bit-identical). ``fold_in(key, epoch)`` shuffles each epoch.
VALIDATION_SPLIT_KEY = 2**31 - 1  # fold_in(key, ·): which examples validation_split holds out
STEP_KEYS = 2**30  # fold_in(fold_in(key, ·), epoch): the epoch key; fold_in(epoch key, step) per step


class _Recorded(NamedTuple):
    """Which metrics ``fit`` records: ``metrics`` as given, or the loss plus accuracy for a loss
    that declares ``classification``. The loss is measured in any case (divergence is judged on it)."""

    loss: bool
    accuracy: bool

    @classmethod
    def of(cls, loss: Loss, metrics: Sequence[str] | None) -> _Recorded:
        if metrics is None:
            return cls(True, bool(getattr(loss, "classification", False)))
        return cls("loss" in metrics, "accuracy" in metrics)

    def select(self, measured: dict[str, float]) -> dict[str, float]:
        """The entries of one epoch's measurements that go into the history, in its order."""
        keep = {"loss": self.loss, "accuracy": self.accuracy, "val_loss": self.loss, "val_accuracy": self.accuracy}
        return {k: v for k, v in measured.items() if keep.get(k, True)}


def _run_epoch(step_jit, scan_jit, carry: EpochCarry, x, y, full, rest, epoch_key, scan_epochs: bool) -> EpochCarry:
    """One epoch of steps: the full batches (in one ``lax.scan`` when ``scan_epochs``), then the rest."""
    if scan_epochs and full.shape[0] > 1:
        carry = scan_jit(carry, x, y, full, epoch_key)
    else:
        for i in range(full.shape[0]):
            carry = step_jit(carry, x, y, full, i, epoch_key, i)
    if rest is not None:
        carry = step_jit(carry, x, y, rest, 0, epoch_key, full.shape[0])
    return carry


def _measure_epoch(carry: EpochCarry, names: _Recorded, loss: Loss, y, n: int, epoch: int, batch_size, privacy,
                   evaluate_jit, x_val, y_val) -> dict[str, float]:
    """The epoch's metrics: training loss (and accuracy) from the carry's sums, ε under DP-SGD,
    validation loss (and accuracy), and the last learning rate where the optimizer has one."""
    seen = float(carry.stats["examples"]) if privacy is not None else n  # Poisson: how many were drawn
    measured = {"loss": float(carry.loss_sum) / max(seen, 1)}
    if names.accuracy:
        measured["accuracy"] = float(carry.correct) / max(seen * examples_counted(y, loss) / n, 1)
    if privacy is not None:
        measured["epsilon"] = privacy.epsilon(n, batch_size, (epoch + 1) * (n // batch_size))
    if x_val is not None:
        v_loss, v_correct = evaluate_jit(carry.params, carry.state, x_val, y_val)
        measured["val_loss"] = float(v_loss)
        if names.accuracy:
            measured["val_accuracy"] = float(v_correct) / examples_counted(y_val, loss)
    rate = read_learning_rate(carry.opt_state, default=None)
    if rate is not None:
        measured["learning_rate"] = float(rate)
    return measured


def _growth_reason(divergence: dict, loss: float, epoch: int, factor: float | None) -> str | None:
    """Why a finite epoch loss counts as divergence, or ``None``: above ``factor`` times the lowest
    loss seen (before training, or at an epoch's end) and above the loss before training."""
    if factor is None:
        return None
    initial, lowest, at = divergence["initial"], divergence["lowest"], divergence["lowest_epoch"]
    seen = [(v, w) for v, w in ((initial, "before training"), (lowest, f"after epoch {(at or 0) + 1}"))
            if v is not None]
    if not seen:
        return None
    floor, where = min(seen, key=lambda vw: vw[0])
    if loss > factor * max(floor, 0.0) and (initial is None or loss > initial):
        above = "" if initial is None or where == "before training" else \
            f", and above the {initial:.4g} it started from"
        return (f"diverged: the training loss {loss:.4g} at epoch {epoch + 1} is more than {factor:g} times its "
                f"lowest value {floor:.4g} ({where}){above}")
    return None


def _stop_on_divergence(loop: fresume.LoopState, reason: str, early_stopping, epoch: int) -> None:
    """Stop with ``reason``, keep the last finite trees (or the best epoch's), and say which."""
    loop.stop_reason, loop.carry = reason, loop.good
    loop.divergence["at"] = epoch + 1
    best_epoch = loop.best_epoch
    kept = f"the best epoch's ({best_epoch + 1})" if early_stopping is not None and best_epoch is not None \
        and early_stopping.restore_best else (f"those after epoch {epoch}" if epoch else "the initial ones")
    warnings.warn(f"fit stopped: {reason}; the returned params are {kept}. Lower the learning rate, clip the "
                  f"gradients (optim.clip_by_global_norm), or check the data", RuntimeWarning, stacklevel=3)


def _result(loop: fresume.LoopState, early_stopping, telemetry) -> FitResult:
    restore = early_stopping is not None and early_stopping.restore_best and loop.best_epoch is not None
    params, state = (loop.best_params, loop.best_state) if restore else loop.carry[:2]
    telemetry_history = {path: {k: np.asarray(v) for k, v in stats.items()}
                         for path, stats in loop.stat_history.items()}
    return FitResult(params, loop.carry[2], {k: np.asarray(v) for k, v in loop.history.items()}, loop.best_epoch,
                     loop.epoch, state, loop.stop_reason or f"completed {loop.epoch} epochs",
                     telemetry_history if telemetry else None, loop.divergence.get("at"))




def _early_stopping(early_stopping: EarlyStopping, loop: fresume.LoopState, value: float, epoch: int) -> None:
    """Record an improvement of the monitored metric, or count one more epoch without one and
    set ``loop.stop_reason`` when patience runs out."""
    if (loop.best is None and math.isfinite(value)) or (loop.best is not None and early_stopping.better(value,
                                                                                                        loop.best)):
        loop.best, loop.best_epoch, loop.best_params, loop.best_state, loop.waited = (value, epoch, *loop.carry[:2],
                                                                                      0)
        return
    loop.waited += 1
    if loop.waited >= early_stopping.patience:
        loop.stop_reason = (f"early stopping: {early_stopping.monitor} did not improve for {early_stopping.patience} "
                            f"epochs (best epoch {loop.best_epoch + 1})" if loop.best_epoch is not None else
                            f"early stopping: {early_stopping.monitor} was never finite")
