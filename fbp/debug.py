"""Where a NaN or inf first appears — named at the rule that *produced* it.

``find_nonfinite`` runs one forward and one backward pass (the same rules as training) with
every layer watched — leaves and combinators alike — and reads, per layer, how many entries of
its output, of the cotangent arriving at its output, of the cotangent it sends to its input and
of its parameter gradient are not finite.

* **Forward**: the first leaf in forward order whose input was finite and whose output is not
  (or the first leaf, when the model's input already holds NaN/inf); if no leaf did it but a
  combinator did, that combinator's own arithmetic (a Residual's sum) produced it.
* **Loss**: the value or the cotangent of the prediction.
* **Backward**: the rule that received only finite cotangents and sent a non-finite one on (or a
  non-finite parameter gradient): the first such leaf in backward order, else the innermost such
  combinator (a Residual adding two huge cotangents, a wrapper that maps the cotangent). The
  layers *below* it that merely received the non-finite cotangent are not blamed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from fbp.core import Layer, Loss, Wrapper, child_params, children, leaf_layers, path_name, run_forward
from fbp.telemetry import floating_leaves

STAGES = ("forward", "loss", "backward")


@dataclasses.dataclass(frozen=True)
class NonFiniteReport:
    """Where the first NaN/inf is. ``path`` is None when everything is finite.

    Attributes:
        path: the leaf layer's path (``"2"``, ``"1/block/0"``), ``"<loss>"`` for the loss, or None.
        stage: ``"forward"``, ``"loss"`` or ``"backward"`` (None when all is finite).
        quantity: ``"output"``, ``"input cotangent"`` (what its backward sent on),
            ``"parameter gradient"``, ``"value"`` or ``"prediction cotangent"``.
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
        elif self.stage == "backward":
            text = (f"find_nonfinite: the first non-finite value is produced in the backward pass by the rule of "
                    f"the layer at path '{self.path}' ({self.layer}): it received a finite output cotangent and "
                    f"returned a {self.quantity} with {entries}")
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


def _count(tree) -> jax.Array:
    return sum((jnp.sum(~jnp.isfinite(a)) for a in floating_leaves(tree)), jnp.zeros((), jnp.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class _Watch(Wrapper):
    """A layer (leaf or combinator, its children watched too) whose backward returns, beside its
    ``d_params``, how many non-finite entries its output, output cotangent, input cotangent and
    (for a leaf) parameter gradient hold: params ``(θ, None)``, d_params ``(∂L/∂θ, counts)``."""

    layer: Layer
    leaf: bool

    def forward(self, params, x, *, state=None, key=None, train=False):
        y, res = run_forward(self.layer, params[0], x, state=state, key=key, train=train)
        return y, (res, _count(x), _count(y))

    def backward(self, res, d_y):
        inner, x_in, out = res
        d_params, d_x = self.layer.backward(inner, d_y)
        counts = {"in": x_in, "out": out, "d_out": _count(d_y), "d_in": _count(d_x),
                  "d_params": _count(d_params) if self.leaf else jnp.zeros((), jnp.int32)}
        return (d_params, counts), d_x


def _watched(layer: Layer) -> Layer:
    kids = children(layer)
    inner = layer.replace_children({name: _watched(kid) for name, kid in kids.items()}) if kids else layer
    return _Watch(inner, not kids)


def _watched_params(layer: Layer, params):
    kids = children(layer)
    if not kids:
        return params, None
    new = {name: _watched_params(kid, child_params(params, name)) for name, kid in kids.items()}
    return (tuple(new[str(i)] for i in range(len(new))) if isinstance(params, (tuple, list)) else new), None


def _collect(layer: Layer, d, path: tuple[str, ...], out: dict) -> None:
    """``out[path] = (layer, counts, depth)`` for every layer, from the watched backward's ``d_params``."""
    inner, counts = d
    out["/".join(path)] = (layer, counts, len(path))
    for name, kid in children(layer).items():
        _collect(kid, child_params(inner, name), (*path, name), out)


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
        A ``NonFiniteReport`` naming the layer (forward) or the rule (backward) that produced the
        first NaN or inf, and its path.
    """
    watched = _watched(model)
    x, y = jnp.asarray(x), jnp.asarray(y)
    if model.has_state and state is None:
        state = model.init_state(params)

    @jax.jit
    def run(params, state, x, y, key):
        pred, res = run_forward(watched, _watched_params(model, params), x, state=state, key=key, train=train)
        value, loss_res = loss.forward(pred, y)
        d_pred = loss.backward(loss_res, jnp.ones((), value.dtype))
        return value, _count(d_pred), jnp.max(jnp.abs(pred)), watched.backward(res, d_pred)[0]

    value, bad_d_pred, pred_absmax, d = jax.device_get(run(params, state, x, y, key))
    nodes: dict[str, tuple[Layer, dict, int]] = {}
    _collect(model, d, (), nodes)
    leaves = [path for path, _ in leaf_layers(model)]
    bad = tuple(path_name(p) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if not _all_finite(leaf))
    context = {"inputs_finite": _all_finite(x), "nonfinite_params": bad, "pred_absmax": float(pred_absmax)}

    def report(path, stage, quantity, key):
        layer, counts, _ = nodes[path]
        return NonFiniteReport(path, stage, quantity, repr(layer), int(counts[key]), **context)

    def broke(path):  # a finite input, a non-finite output (the model's input may itself hold NaN/inf)
        counts = nodes[path][1]
        return counts["out"] > 0 and (counts["in"] == 0 or path == leaves[0])

    for path in leaves:
        if broke(path):
            return report(path, "forward", "output", "out")
    combined = sorted((p for p in nodes if p not in leaves and broke(p)), key=lambda p: -nodes[p][2])
    if combined:  # no leaf's output, but a combinator's: its own arithmetic
        return report(combined[0], "forward", "output", "out")
    if not math.isfinite(float(value)):
        return NonFiniteReport("<loss>", "loss", "value", repr(loss), 1, **context)
    if bad_d_pred > 0:
        return NonFiniteReport("<loss>", "loss", "prediction cotangent", repr(loss), int(bad_d_pred), **context)

    def produced(path):
        counts = nodes[path][1]
        if counts["d_out"] > 0:
            return None
        return "parameter gradient" if counts["d_params"] > 0 else ("input cotangent" if counts["d_in"] > 0 else None)

    for path in reversed(leaves):
        quantity = produced(path)
        if quantity is not None:
            return report(path, "backward", quantity, "d_params" if quantity == "parameter gradient" else "d_in")
    combinators = sorted((p for p in nodes if p not in leaves and produced(p)), key=lambda p: -nodes[p][2])
    if combinators:
        return report(combinators[0], "backward", "input cotangent", "d_in")
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
