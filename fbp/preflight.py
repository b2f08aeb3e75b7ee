"""What ``fbp.train.fit`` checks before its first step, so that nothing fails — or silently
misleads — after an epoch has trained: the arguments, the targets against the model's output
and the loss's conventions, the validation data against the training data, the
early-stopping monitor against the metrics ``fit`` will record, and the settings (telemetry,
the optimizer, privacy, a mesh) alone and together."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp import parallel
from fbp import privacy as fprivacy
from fbp import telemetry as ftelemetry
from fbp.core import InputError, Layer, Loss, require_key, require_number
from fbp.optim import GradientTransformation

PyTree = Any


def _require_int(name: str, value, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        extra = " or None" if none_ok else ""
        raise ValueError(f"fit: {name} must be an int >= {low}{extra}, got {value!r}")


def check_arguments(loss: Loss, key, epochs, batch_size, validation_split, log_every,
                    metrics: Sequence[str] | None) -> None:
    """Check ``fit``'s scalar arguments, its key, and a loss that reduces to one number.

    Args:
        loss: the loss (its ``reduction`` must be ``"mean"`` or ``"sum"``).
        key: the random key.
        epochs: an int ≥ 1.
        batch_size: an int ≥ 1, or ``None`` for full-batch.
        validation_split: a float in ``[0, 1)``.
        log_every: an int ≥ 0.
        metrics: ``None`` or a list drawn from ``["loss", "accuracy"]``.

    Raises:
        TypeError: a value of the wrong type.
        ValueError: a value out of range, unknown metrics, or a loss with ``reduction="none"``.
        InputError: ``key`` is not a random key.
    """
    require_key("fit", key)
    _require_int("epochs", epochs, 1)
    _require_int("batch_size", batch_size, 1, none_ok=True)
    _require_int("log_every", log_every, 0)
    require_number("fit", "validation_split", validation_split, low=0.0, high=1.0, high_open=True)
    if metrics is not None and (isinstance(metrics, str) or not set(metrics) <= {"loss", "accuracy"}):
        raise ValueError(f"fit: metrics must be a list drawn from ['loss', 'accuracy'], got {metrics!r}")
    if getattr(loss, "reduction", "mean") not in ("mean", "sum"):
        raise ValueError(f"fit: {loss!r} returns one value per example; fit needs reduction='mean' or 'sum'")


def check_checkpointing(directory, every, resume, keep) -> None:
    """Check ``fit``'s checkpoint arguments.

    Args:
        directory: ``checkpoint_dir``, a path or ``None``.
        every: ``checkpoint_every``, an int ≥ 1.
        resume: ``True`` or ``False``.
        keep: ``keep_checkpoints``, an int ≥ 1 or ``None`` (keep all).

    Raises:
        TypeError: a value of the wrong type.
        ValueError: ``resume=True`` without a directory, or a count out of range.
    """
    if directory is not None and not isinstance(directory, (str, bytes, os.PathLike)):
        raise TypeError(f"fit: checkpoint_dir must be a path, got {type(directory).__name__}")
    _require_int("checkpoint_every", every, 1)
    _require_int("keep_checkpoints", keep, 1, none_ok=True)
    if not isinstance(resume, bool):
        raise TypeError(f"fit: resume must be True or False, got {resume!r}")
    if resume and directory is None:
        raise ValueError("fit: resume=True needs the checkpoint_dir to resume from")


def recorded_metrics(classify: bool, validation: bool, loss: bool = True) -> list[str]:
    """The names ``fit`` records in its history, in order.

    Args:
        classify: the loss is a classification loss (accuracy is recorded).
        validation: there is validation data (``val_`` twins are recorded).
        loss: record the loss (``metrics`` may leave it out).

    Returns:
        E.g. ``["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]``.
    """
    names = (["loss"] if loss else []) + (["accuracy"] if classify else [])
    return names + [f"val_{n}" for n in names] * validation + ["learning_rate", "seconds"]


def check_monitor(monitor: str, recorded: list[str], classify: bool) -> None:
    """Check that an early-stopping monitor is among the metrics ``fit`` records.

    Args:
        monitor: the monitored name (``"val_loss"``, say).
        recorded: what ``recorded_metrics`` returns for this fit.
        classify: the loss is a classification loss.

    Raises:
        ValueError: the monitor is not recorded; the message says why (no validation data, or
            accuracy for a regression loss).
    """
    if monitor in recorded:
        return
    if monitor.startswith("val_") and not any(name.startswith("val_") for name in recorded):
        raise ValueError(f"early stopping monitors {monitor!r} but there is no validation data: "
                         f"pass validation_data or validation_split")
    raise ValueError(f"early stopping monitors {monitor!r}, but this fit records only {recorded[:-2]}"
                     + ("" if classify else " (accuracy is recorded for classification losses only)"))


def _output_shape(model: Layer, params: PyTree, state: PyTree, x) -> tuple[int, ...]:
    """The model's output shape for the whole of ``x`` (evaluation mode; nothing is computed)."""
    spec = jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x[:0]).dtype)
    out = jax.eval_shape(lambda p, s, xx: model.apply(p, xx, state=s), params, state, spec)
    return tuple(out.shape)


def check_data(model: Layer, loss: Loss, params, state, x, y, x_val, y_val) -> None:
    """Check the data against the model and loss before any training step.

    Targets against the model's output (label ranges, conventions), validation data against the
    training data, and probabilities for ``from_logits=False`` (the initial predictions on up to
    256 examples).

    Args:
        model: the model.
        loss: the loss (its ``check_target`` if it has one).
        params: the initial params.
        state: the initial state (``None`` without).
        x: the training inputs.
        y: the training targets.
        x_val: the validation inputs, or ``None``.
        y_val: the validation targets, or ``None``.

    Raises:
        InputError: targets that do not fit the loss or the model's output, naming which data.
        ValueError: validation data whose trailing shapes differ from the training data's.
    """
    pred_shape = _output_shape(model, params, state, x)
    check_target = getattr(loss, "check_target", None)  # a user's own Loss may not have one
    if check_target is None:
        def check_target(target, shape):  # shapes only: trace the loss on an abstract prediction
            jax.eval_shape(loss.forward, jax.ShapeDtypeStruct(shape, jnp.float32), jnp.asarray(target))
    with _named("training data"):
        check_target(y, pred_shape)
    if x_val is not None:
        for what, a, b in (("features", x, x_val), ("targets", y, y_val)):
            if np.shape(a)[1:] != np.shape(b)[1:]:
                raise ValueError(f"fit: validation {what} have shape {np.shape(b)}, training {what} {np.shape(a)}: "
                                 f"they must agree on every axis after the first")
        with _named("validation data"):
            check_target(y_val, (len(y_val), *pred_shape[1:]))
    if getattr(loss, "from_logits", True) is False:
        sample = jnp.asarray(x[:256])
        pred = jax.jit(lambda p, s, xx: model.apply(p, xx, state=s))(params, state, sample)
        with _named("the model's initial predictions"):
            loss.forward(pred, jnp.asarray(y[:256]))


@contextlib.contextmanager
def _named(what: str) -> Iterator[None]:
    """Prefix an ``InputError`` raised inside the block with what was being checked."""
    try:
        yield
    except InputError as err:
        raise InputError(err.owner, f"{what}: {err.detail}", err.path, err.param) from None


def telemetry_setting(model: Layer, telemetry):
    """``fit``'s ``telemetry`` checked before training.

    Args:
        model: the model (the names are checked against its probes).
        telemetry: ``True``, ``False`` or a selection of ``fbp.telemetry.STATS``.

    Returns:
        The bool, or the names as a tuple.

    Raises:
        TypeError: anything else.
    """
    if isinstance(telemetry, bool):
        return telemetry
    if isinstance(telemetry, str) or not isinstance(telemetry, Sequence):
        raise TypeError(f"fit: telemetry must be True, False or a list of statistic names from "
                        f"{ftelemetry.STATS}, got {telemetry!r}")
    ftelemetry.Instrumented.of(model, None, stats=telemetry)  # names checked before training
    return tuple(telemetry)

def optimizer_setting(optimizer, x, y, privacy) -> GradientTransformation:
    """``fit``'s ``optimizer`` as a transformation.

    Args:
        optimizer: a ``GradientTransformation`` or a ``fbp.kfac.KFAC`` (made one, its factors
            shaped by the first example).
        x: the training inputs.
        y: the training targets.
        privacy: the ``DPSGD`` settings, or ``None``.

    Returns:
        The transformation.

    Raises:
        TypeError: neither.
        ValueError: one that reads curvature from the pass, under DP-SGD.
    """
    from fbp.kfac import KFAC

    if isinstance(optimizer, KFAC):
        optimizer = optimizer.transformation(x[:1], y[:1])
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"fit: optimizer must be a fbp.optim transformation (e.g. fbp.optim.adam(1e-3)) or a "
                        f"fbp.kfac.KFAC, got {type(optimizer).__name__}")
    if privacy is not None and optimizer.extensions:
        raise ValueError(f"fit: privacy cannot be combined with an optimizer that reads curvature from the pass "
                         f"({[e.name for e in optimizer.extensions]}): its factors are built from every example's "
                         f"unclipped, un-noised gradients, so the updates would not be private. Use a first-order "
                         f"optimizer under DP-SGD")
    return optimizer

def data_parallel_setting(mesh, privacy, batch_size, n, x, y, params, state, opt_state):
    """Checks for ``fit(mesh=...)``; the data set and the carried trees replicated on the mesh.

    Args:
        mesh: a ``fbp.parallel.data_mesh``.
        privacy: the ``DPSGD`` settings, or ``None``.
        batch_size: ``fit``'s batch size.
        n: the number of training examples.
        x: the training inputs.
        y: the training targets.
        params: the params.
        state: the model state.
        opt_state: the optimizer state.

    Returns:
        ``(x, y, params, state, opt_state)`` on the mesh's devices.

    Raises:
        ValueError: a batch the devices cannot share (a Poisson buffer: one larger than the data).
    """
    parallel.require_mesh(mesh, "fit")
    if privacy is not None and privacy.sampling == "poisson":  # the buffer is rounded up to the device count
        fprivacy.buffer_rows(n, batch_size, mesh)
    elif privacy is None or privacy.sampling == "fixed":
        parallel.require_divisible(n if batch_size is None else batch_size, mesh,
                               "fit: the training set (batch_size=None)" if batch_size is None else "fit: batch_size")
    rep = parallel.replicated(mesh)
    return tuple(parallel.place(t, rep) for t in (x, y, params, state, opt_state))

def private_setting(privacy, batch_size, telemetry, n):
    """``fit``'s ``privacy`` checked (a warning when telemetry reads the clipped pass).

    Args:
        privacy: the ``DPSGD`` settings.
        batch_size: the expected batch size.
        telemetry: ``fit``'s telemetry setting.
        n: the number of training examples.

    Returns:
        ``(privacy, n, batch_size)`` for ``fbp.privacy.private_step``.

    Raises:
        TypeError: not a ``DPSGD``.
        ValueError: no batch size between 1 and ``n``.
    """
    if not isinstance(privacy, fprivacy.DPSGD):
        raise TypeError(f"fit: privacy must be an fbp.privacy.DPSGD, got {type(privacy).__name__}")
    if batch_size is None or batch_size > n:
        raise ValueError(f"fit: DP-SGD needs an expected batch_size between 1 and the {n} training examples, "
                         f"got {batch_size}")
    if telemetry:
        warnings.warn("fit: telemetry under DP-SGD reads the clipped pass (each example's cotangents scaled by its "
                      "clipping weight, the buffer's padding rows left out), before the noise: the statistics are "
                      "not differentially private and epsilon does not cover them; keep them to yourself",
                      UserWarning, stacklevel=3)
    return privacy, n, int(batch_size)


def diagnostics_setting(diagnostics, every, telemetry, privacy, precision, optimizer, opt_state, params):
    """``fit``'s ``diagnostics`` as a ``fbp.diagnostics.Watch`` and the optimizer state that
    carries them (``DiagnosticsState``), or ``(None, opt_state)``.

    Args:
        diagnostics: ``fit``'s argument (``None``: none).
        every: ``diagnostics_every``.
        telemetry: the telemetry setting.
        privacy: the ``DPSGD`` settings, or ``None``.
        precision: the precision policy, or ``None``.
        optimizer: the transformation.
        opt_state: its state.
        params: the initial params.

    Returns:
        ``(watch, opt_state)``.

    Raises:
        ValueError: a combination that cannot be diagnosed (with the reason), or a bad setting.
    """
    from fbp.diagnostics import DiagnosticsState, watch

    if diagnostics is None:
        return None, opt_state
    reasons = {"privacy": (privacy is not None, "the diagnostics read every example's unclipped gradient (norms, "
                           "projections, histograms): recorded in a private run they would leak what DP-SGD "
                           "protects"),
               "precision": (precision is not None, "the diagnostics' pass runs in the params' dtype, not under a "
                             "mixed-precision policy; diagnose a float32 run"),
               "telemetry": (bool(telemetry), "both instrument the pass and are not yet combined in one step; the "
                             "diagnostics hold per-layer gradient norms and update ratios, or run telemetry apart"),
               "an optimizer that reads curvature from the pass (K-FAC)": (
                   bool(getattr(optimizer, "extensions", ())), "its own extensions and the diagnostics' are not yet "
                   "run in one pass; diagnose a first-order optimizer")}
    for name, (given, why) in reasons.items():
        if given:
            raise ValueError(f"fit: diagnostics cannot be combined with {name}: {why}")
    settings = watch(diagnostics, every)
    if not isinstance(opt_state, DiagnosticsState):
        opt_state = DiagnosticsState.begin(opt_state, params)
    return settings, opt_state
