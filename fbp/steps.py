"""The training step: one jitted update, and the pieces of an epoch that ``fit`` runs.

``make_step`` is the cycle of backpropagation as one function — forward, loss, backward,
update — jitted; ``fbp.train.fit`` runs the indexed form of the same step (it gathers its
batch by index from data that stays on the device, and accumulates the epoch's loss and
correct count in its carry), one call per step or one ``lax.scan`` per epoch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp import parallel
from fbp import privacy as fprivacy
from fbp.core import (
    Layer,
    Loss,
    require_state,
    require_state_mode,
)
from fbp.optim import GradientTransformation, apply_updates
from fbp.step_pass import gradient_function, optimizer_update  # noqa: F401  (gradient_function: public here)

PyTree = Any


# --------------------------------------------------------------------------- metrics
def correct_count(pred, target, loss: Loss, where=None) -> jax.Array:
    """How many predictions are right: argmax over classes, or a threshold for one output.

    For one output the loss declares the thresholds (``score_threshold``: 0 for logits and hinge
    scores, 0.5 for probabilities; ``label_threshold``: 0 for ±1 labels, 0.5 for {0, 1}).

    Args:
        pred: the predictions, ``(B, classes)`` or ``(B, 1)`` (or with a sequence axis).
        target: integer labels, one-hot/soft targets, or binary targets.
        loss: the loss, for its thresholds.
        where: ``(B,)`` booleans: count only those examples (``None``: all).

    Returns:
        The count, a scalar integer array.
    """
    if pred.ndim >= 2 and pred.shape[-1] > 1:
        labels = target if jnp.issubdtype(target.dtype, jnp.integer) else jnp.argmax(target, axis=-1)
        right = jnp.argmax(pred, axis=-1) == labels
    else:
        score = getattr(loss, "score_threshold", 0.0 if getattr(loss, "from_logits", False) else 0.5)
        right = (pred > score) == (target > getattr(loss, "label_threshold", 0.5))
    if where is not None:
        right = right & where.reshape(where.shape + (1,) * (right.ndim - 1))
    return jnp.sum(right)


def evaluate(model: Layer, loss: Loss, params: PyTree, x, y, *, state: PyTree = None) -> dict[str, float]:
    """The loss (and accuracy, for classification losses) in evaluation mode.

    Args:
        model: the model.
        loss: the loss.
        params: the params.
        x: the inputs.
        y: the targets.
        state: the model state, or ``None``.

    Returns:
        ``{"loss": ..., "accuracy": ...}`` as Python floats.
    """
    pred = jax.jit(lambda p, s, xx: model.apply(p, xx, state=s))(params, state, jnp.asarray(x))
    out = {"loss": float(loss(pred, jnp.asarray(y)))}
    if getattr(loss, "classification", False):
        out["accuracy"] = float(correct_count(pred, jnp.asarray(y), loss)) / examples_counted(y, loss)
    return out


# --------------------------------------------------------------------------- the step
def make_step(model: Layer, loss: Loss, optimizer: GradientTransformation, *, jit: bool = True,
              has_state: bool = False, mesh=None, fsdp: bool = False, precision=None) -> Callable:
    """One training step: forward, loss, backward, optimizer update.

    Args:
        model: the network (a layer).
        loss: a mean- or sum-reduced loss.
        optimizer: a ``fbp.optim`` gradient transformation.
        jit: compile the step (default).
        has_state: for models that keep state (BatchNorm); required for them.
        mesh: data parallel over a ``fbp.parallel.data_mesh`` (below).
        fsdp: with ``mesh``, shard large leaves instead of replicating them.
        precision: a mixed-precision policy (below).

    Returns:
        ``step(params, opt_state, x, y, *, key=None) -> (params, opt_state, loss_value)``;
        ``key`` only for models with random layers. With ``has_state=True``:
        ``step(params, state, opt_state, x, y, *, key=None) -> (params, state, opt_state,
        loss_value)`` (a model that keeps state must use it: its new state would otherwise be lost).

    ``mesh`` (``fbp.parallel.data_mesh``): data parallel — the batch is split over the mesh
    and params, model state and optimizer state are replicated (``fsdp=True``: leaves of 2¹⁸
    elements or more are split instead, ``fbp.parallel.fsdp_sharding``). Inputs are placed
    there on every call (a no-op once they are), the params, state and optimizer-state buffers
    are donated (the arrays passed in are consumed: keep a copy to reuse them), and the step
    compiles once. A batch the device count does not divide raises.

    ``precision``: a ``fbp.precision.Policy`` (or its text, ``"bfloat16"``): layers compute
    in ``compute``, the loss in ``output``, params and optimizer state stay in ``params``; with a
    ``fbp.precision.loss_scaled`` optimizer the backward is seeded with its loss scale."""
    require_state_mode(model, has_state, "fbp.train.make_step")
    if mesh is not None:
        parallel.require_mesh(mesh, "fbp.train.make_step")
    update = optimizer_update(model, loss, optimizer, precision, "fbp.train.make_step")

    def step(params, opt_state, x, y, *, key=None):
        value, updates, opt_state, _, _, _ = update(params, opt_state, x, y, key=key)
        return apply_updates(params, updates), opt_state, value

    def step_with_state(params, state, opt_state, x, y, *, key=None):
        require_state(model, state, "fbp.train.make_step")
        value, updates, opt_state, _, state, _ = update(params, opt_state, x, y, state=state, key=key)
        return apply_updates(params, updates), state, opt_state, value

    chosen = step_with_state if has_state else step
    if mesh is None:
        return jax.jit(chosen) if jit else chosen
    if not jit:
        raise ValueError("fbp.train.make_step: a mesh needs jit=True (the sharded step is a jitted program)")
    return _data_parallel(chosen, mesh, fsdp, 3 if has_state else 2)


_CARRIED = ("params", "state", "opt_state")


def _require_not_donated(carried) -> None:
    """The sharded step donates what it carries; a second call with the same (deleted) arrays gets
    a message that says so, instead of JAX's "Array has been deleted"."""
    names = _CARRIED if len(carried) == 3 else ("params", "opt_state")
    for name, tree in zip(names, carried, strict=True):
        if any(isinstance(a, jax.Array) and a.is_deleted() for a in jax.tree_util.tree_leaves(tree)):
            raise ValueError(f"fbp.train.make_step(mesh=...): the {name} passed in were donated to an earlier call "
                             f"(the data-parallel step consumes params, model state and optimizer state to reuse "
                             f"their memory) and no longer exist. Pass what the previous call returned: params, "
                             f"opt_state, loss = step(params, opt_state, x, y); to keep the old values too, copy "
                             f"them first: kept = jax.tree_util.tree_map(jnp.copy, {name})")


def _data_parallel(step: Callable, mesh, fsdp: bool, num_carried: int) -> Callable:
    """``step`` jitted over ``mesh``: the carried leading arguments (params, state, optimizer
    state) replicated or FSDP-sharded and donated, the batch split over the mesh."""
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def layout(tree):
        return parallel.fsdp_sharding(tree, mesh) if fsdp else jax.tree_util.tree_map(lambda _: rep, tree)

    def inner(*args, key=None):
        carried = args[:num_carried]
        x, y = parallel.constrain_batch(args[num_carried:], mesh)
        out = step(*carried, x, y, key=key)
        return (*jax.lax.with_sharding_constraint(out[:num_carried], layout(out[:num_carried])), out[-1])

    jitted = jax.jit(inner, donate_argnums=tuple(range(num_carried)))

    def sharded(*args, key=None):
        if len(args) != num_carried + 2:
            raise TypeError(f"the data-parallel step takes {num_carried + 2} arguments, got {len(args)}")
        x, y = args[num_carried:]
        _require_not_donated(args[:num_carried])
        parallel.require_divisible(jax.tree_util.tree_leaves(x)[0].shape[0], mesh)
        carried = tuple(parallel.place(a, layout(a)) for a in args[:num_carried])
        return jitted(*carried, parallel.place(x, data), parallel.place(y, data),
                      key=None if key is None else parallel.place(key, rep))

    sharded.jitted = jitted  # for inspection: jitted._cache_size(), lower(...)
    return sharded


class EpochCarry(NamedTuple):
    """What ``fit``'s jitted step carries from one step to the next within an epoch."""

    params: PyTree
    state: PyTree  # the model's state (None for stateless models)
    opt_state: PyTree
    loss_sum: jax.Array  # float32: the epoch's summed per-example losses so far
    correct: jax.Array  # int32: the epoch's correct predictions so far
    stats: PyTree  # telemetry's summed statistics, DP-SGD's {"examples": count}, or {}
    first_loss: jax.Array  # float32: the loss per example of the epoch's first step, before its update (NaN before)

    @classmethod
    def start(cls, params, state, opt_state, stats) -> EpochCarry:
        """The carry at the start of an epoch: the trained trees and zero sums."""
        return cls(params, state, opt_state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), stats,
                   jnp.full((), jnp.nan, jnp.float32))

    @property
    def trees(self) -> tuple:
        """``(params, state, opt_state)``: what lives on after the epoch."""
        return self.params, self.state, self.opt_state


def _indexed_step(model, loss, optimizer, augment=None, telemetry=False, mesh=None, precision=None, diagnostics=None):
    """The step the fit loop runs: gathers its batch by index and accumulates, in the carry, the
    epoch's summed loss and correct count (no host round trip per step) and, with ``telemetry``,
    the summed per-layer statistics of ``fbp.telemetry`` from the same pass; with
    ``diagnostics`` (a ``fbp.diagnostics.Watch``), writes the step's into its row of the carry."""
    reads = bool(getattr(optimizer, "extensions", ())) or diagnostics is not None
    if diagnostics is not None:
        from fbp.diagnostics import record
        from fbp.diagnostics.training import watched_update

        update = watched_update(model, loss, optimizer, diagnostics)
    else:
        update = optimizer_update(model, loss, optimizer, precision, "fit",
                                  telemetry=(telemetry_stats(telemetry) or ()) if telemetry else None)

    def step(carry: EpochCarry, x, y, batches, row, epoch_key, step_number) -> EpochCarry:
        params, state, opt_state, loss_sum, correct, stat_sum, first_loss = carry
        idx = batches[row]
        xb, yb = x[idx], y[idx]
        if mesh is not None:  # data parallel: each device computes on its slice of the batch
            xb, yb = parallel.constrain_batch((xb, yb), mesh)
        step_key = jax.random.fold_in(epoch_key, step_number)
        if augment is not None:
            xb = augment(jax.random.fold_in(step_key, 1), xb)
        key = step_key if model.needs_key or reads else None  # sampled curvature needs one too
        value, updates, opt_state, pred, state, q = update(params, opt_state, xb, yb, state=state, key=key)
        if telemetry:  # the statistics of the same pass
            stat_sum = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), stat_sum, q["stats"])
        if diagnostics is not None:
            stat_sum = record.write(stat_sum, step_number, q)
        per_batch = idx.shape[0] if loss.reduction == "mean" else 1  # "sum" already adds the examples up
        loss_sum = loss_sum + value.astype(jnp.float32) * per_batch
        first_loss = jnp.where(step_number == 0, value.astype(jnp.float32) * per_batch / idx.shape[0], first_loss)
        correct = correct + correct_count(pred, yb, loss).astype(jnp.int32)
        return EpochCarry(apply_updates(params, updates), state, opt_state, loss_sum, correct, stat_sum, first_loss)

    return step


def telemetry_stats(telemetry):
    """The statistic names ``fit``'s ``telemetry`` argument asks for.

    Args:
        telemetry: ``fit``'s argument: ``True`` (every statistic) or a selection of names.

    Returns:
        ``None`` for every statistic, else the selection.
    """
    return None if telemetry is True else telemetry


def epoch_batches(n: int, batch_size: int | None, key):
    """One epoch's row indices, made with one reshape (no per-batch host work).

    Args:
        n: the number of examples.
        batch_size: the batch size, or ``None`` for the whole set.
        key: the epoch's shuffle key, or ``None`` for the data's order.

    Returns:
        ``(full, rest)``: ``full`` is ``(num_full_batches, size)``, ``rest`` is
        ``(1, n mod size)`` or ``None``.

    Raises:
        ValueError: ``batch_size`` below 1.
    """
    size = n if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (the whole data set), got {batch_size}")
    order = jnp.arange(n) if key is None else jax.random.permutation(key, n)
    k = n // size
    full = order[:k * size].reshape(k, size)
    return full, (order[k * size:][None] if n % size else None)


def _build(model, loss, optimizer, augment, telemetry=False, private=None, mesh=None, precision=None,
           diagnostics=None):
    step = _indexed_step(model, loss, optimizer, augment, telemetry, mesh, precision, diagnostics) \
        if private is None else fprivacy.private_step(model, loss, optimizer, *private, correct_count, augment,
                                                      telemetry=telemetry, mesh=mesh)

    def scan_epoch(carry, x, y, batches, epoch_key):
        body = lambda c, i: (step(c, x, y, batches, i, epoch_key, i), None)
        return jax.lax.scan(body, carry, jnp.arange(batches.shape[0]))[0]

    return (jax.jit(step), jax.jit(scan_epoch),
            jax.jit(lambda p, s, xv, yv: _eval_stats(model, loss, p, s, xv, yv)))


_build_cached = functools.lru_cache(maxsize=32)(_build)


def compiled_epoch(model, loss, optimizer, augment=None, telemetry=False, private=None, mesh=None, precision=None,
                   diagnostics=None):
    """The jitted pieces of a ``fit`` epoch, cached so a second ``fit`` with the same objects does not recompile.

    Layers and losses are hashable frozen dataclasses; an unhashable user layer is built afresh.

    Args:
        model: the model.
        loss: the loss.
        optimizer: the optimizer.
        augment: an augmentation ``(key, x) -> x``, or ``None``.
        telemetry: ``False``, ``True`` or a selection of statistic names.
        private: ``(spec, n, batch_size)`` for DP-SGD, or ``None``.
        mesh: a device mesh for data parallelism, or ``None``.
        precision: a mixed-precision policy, or ``None``.
        diagnostics: a ``fbp.diagnostics.Watch``, or ``None``.

    Returns:
        ``(step, scan_epoch, evaluate)``, each jitted: one step, a whole epoch of steps under
        ``lax.scan``, and the evaluation-mode loss and correct count.
    """
    try:
        return _build_cached(model, loss, optimizer, augment, telemetry, private, mesh, precision, diagnostics)
    except TypeError:  # an unhashable user layer: build afresh
        return _build(model, loss, optimizer, augment, telemetry, private, mesh, precision, diagnostics)


def _eval_stats(model, loss, params, state, x, y):
    """The loss per example (whatever the loss's reduction, as the training history) and the
    correct count, in evaluation mode."""
    pred = model.apply(params, x, state=state)
    value = loss(pred, y)
    return (value / x.shape[0] if loss.reduction == "sum" else value), correct_count(pred, y, loss)


def examples_counted(y, loss) -> int:
    """The number of predictions accuracy is counted over, from the target's shape.

    Args:
        y: the targets (integer labels, or one-hot/soft targets with a class axis).
        loss: the loss (``class_axis`` says whether the last axis is classes).

    Returns:
        The count: every label position for class targets, every entry otherwise.
    """
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.integer) or getattr(loss, "class_axis", False):
        return math.prod(y.shape if jnp.issubdtype(y.dtype, jnp.integer) else y.shape[:-1])
    return math.prod(y.shape)
