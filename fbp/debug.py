"""Where a NaN or inf first appears: forward order, then the loss, then backward order.

``find_nonfinite`` runs one forward and one backward pass with ``fbp.telemetry``'s probes
(the same pass as training, every rule fbp's own) and reads, per leaf layer, how many entries
of its output, of the cotangent arriving at its output and of its parameter gradient are not
finite. The first layer in forward order whose *output* holds one is where the forward pass
broke (its input was finite: the layer before it was checked first); if the forward pass and the
loss are finite, the first layer in backward order whose output cotangent or parameter gradient
holds one is where the backward pass broke.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from fbp.core import Layer, Loss, leaf_layers, path_name
from fbp.telemetry import Instrumented, floating_leaves

STAGES = ("forward", "loss", "backward")


@dataclasses.dataclass(frozen=True)
class NonFiniteReport:
    """Where the first NaN/inf is. ``path`` is None when everything is finite.

    Attributes:
        path: the leaf layer's path (``"2"``, ``"1/block/0"``), ``"<loss>"`` for the loss, or None.
        stage: ``"forward"``, ``"loss"`` or ``"backward"`` (None when all is finite).
        quantity: ``"output"``, ``"output cotangent"``, ``"parameter gradient"``, ``"value"`` or
            ``"prediction cotangent"``.
        layer: the layer's (or loss's) repr.
        count: how many entries are NaN/inf.
        inputs_finite: whether the inputs ``x`` were finite.
        nonfinite_params: the parameter paths (``"2/w"``) that already hold NaN/inf.
        pred_absmax: the largest ``|prediction|``, for a loss that overflows on a finite prediction.
    """

    path: str | None
    stage: str | None
    quantity: str | None
    layer: str | None
    count: int = 0
    inputs_finite: bool = True
    nonfinite_params: tuple[str, ...] = ()
    pred_absmax: float = math.nan

    @property
    def params_finite(self) -> bool:
        return not self.nonfinite_params

    def __bool__(self) -> bool:  # truthy when something was found
        return self.path is not None

    def __str__(self) -> str:
        if self.path is None:
            return "find_nonfinite: every output, cotangent and gradient is finite"
        entries = f"{self.count} NaN/inf entr{'y' if self.count == 1 else 'ies'}"
        if self.stage == "loss":
            text = (f"find_nonfinite: every layer's output is finite (largest prediction "
                    f"|{self.pred_absmax:.3g}|), but the loss {self.layer} gives a non-finite {self.quantity} "
                    f"({entries}) — an overflow from huge predictions (lower the learning rate, clip gradients) "
                    f"or targets outside the loss's conventions")
        else:
            text = (f"find_nonfinite: the first non-finite value appears in the {self.stage} pass, in the "
                    f"{self.quantity} of the layer at path '{self.path}' ({self.layer}): {entries}")
        if not self.inputs_finite:
            text += "; note: the input x already holds NaN/inf"
        if not self.params_finite:
            text += f"; note: the parameters {list(self.nonfinite_params)} already hold NaN/inf"
        return text


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(a))) for a in floating_leaves(tree))


def find_nonfinite(model: Layer, loss: Loss, params: Any, x, y, *, state=None, key=None,
                   train: bool = True) -> NonFiniteReport:
    """Run ``model`` forward and backward on ``(x, y)`` and report where a NaN/inf first appears.

    ``state``, ``key``, ``train``: the forward's context, as for ``fbp.value_and_grad`` (training
    mode by default). Runs jitted; returns a ``NonFiniteReport`` (``str()`` is readable).

    Args:
        model: the network.
        loss: the loss.
        params: its parameters.
        x: an input batch.
        y: the targets.
        state: the model's state, for models that keep one.
        key: the forward's random key.
        train: training mode (default).

    Returns:
        A ``NonFiniteReport`` naming the first layer (forward or backward) and path where a NaN or inf appears.
    """
    inst = Instrumented.of(model, alignment=False, input_cotangents=True)
    x, y = jnp.asarray(x), jnp.asarray(y)
    if model.has_state and state is None:
        state = model.init_state(params)

    @jax.jit
    def run(params, state, x, y, key):
        value, _, pred, _, stats = inst.run(loss, params, x, y, state=state, key=key, train=train, detail=True)
        _, loss_res = loss.forward(pred, y)
        d_pred = loss.backward(loss_res, jnp.ones((), value.dtype))
        return value, jnp.sum(~jnp.isfinite(d_pred)), jnp.max(jnp.abs(pred)), stats

    value, bad_d_pred, pred_absmax, stats = jax.device_get(run(params, state, x, y, key))
    leaves = list(leaf_layers(model))
    bad = tuple(path_name(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if not _all_finite(leaf))
    context = {"inputs_finite": _all_finite(x), "nonfinite_params": bad,
               "pred_absmax": float(pred_absmax)}
    for path, layer in leaves:
        if stats[path]["nonfinite_out"] > 0:
            return NonFiniteReport(path, "forward", "output", repr(layer), int(stats[path]["nonfinite_out"]),
                                   **context)
    if not math.isfinite(float(value)):
        return NonFiniteReport("<loss>", "loss", "value", repr(loss), 1, **context)
    if bad_d_pred > 0:
        return NonFiniteReport("<loss>", "loss", "prediction cotangent", repr(loss), int(bad_d_pred), **context)
    for path, layer in reversed(leaves):
        for quantity, name in (("output cotangent", "nonfinite_d_out"), ("parameter gradient", "nonfinite_d_params")):
            if stats[path][name] > 0:
                return NonFiniteReport(path, "backward", quantity, repr(layer), int(stats[path][name]), **context)
    return NonFiniteReport(None, None, None, None, 0, **context)


def replay_epoch(model: Layer, loss: Loss, step, carry, x, y, full, rest, epoch_key) -> NonFiniteReport:
    """Replay an epoch of ``fit`` to the first step whose loss is not finite, and localise it.

    The replay runs ``fit``'s own jitted ``step`` from the ``carry`` the epoch started with, then
    ``find_nonfinite`` on that step's params and batch (or, if no loss turned non-finite, on the
    params the last step left). Augmentation is not replayed.

    Args:
        model: the model.
        loss: the loss.
        step: ``fit``'s jitted step ``(carry, x, y, rows, i, epoch_key, number) -> carry``.
        carry: the carry at the start of the epoch.
        x: the training inputs.
        y: the training targets.
        full: the epoch's full batches' row indices, ``(steps, batch_size)``.
        rest: the last, partial batch's row indices, or ``None``.
        epoch_key: the epoch's random key.

    Returns:
        The ``NonFiniteReport`` of the first non-finite step.
    """
    batches = [(full, i, i) for i in range(full.shape[0])] + ([(rest, 0, full.shape[0])] if rest is not None else [])
    for rows, i, number in batches:
        after = step(carry, x, y, rows, i, epoch_key, number)
        last = number == batches[-1][2]
        if not math.isfinite(float(after.loss_sum)) or last:  # the loss of this step, or else the params it left
            at = carry if not math.isfinite(float(after.loss_sum)) else after
            idx = rows[i]
            key = jax.random.fold_in(epoch_key, number) if model.needs_key else None
            return find_nonfinite(model, loss, at.params, x[idx], y[idx], state=at.state, key=key)
        carry = after
