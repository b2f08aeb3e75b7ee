"""Losses, each value with its gradient beside it (Nielsen's "cost and delta" pairing).

Every loss maps ``pred`` of shape ``(N, ...)`` (axis 0 is the batch) and a ``target`` to

* elementwise losses (MSE, MAE, Huber, Hinge, BCE): per-element values ``e``; the
  per-example value ``ℓ_n`` is their **mean** over the non-batch axes (as Keras does);
* class losses (categorical cross-entropy, multiclass hinge): values **summed** over the class
  axis (the last one), then averaged over any other non-batch axes (e.g. time).

``reduction="mean"`` (default) returns ``(1/N) Σ_n ℓ_n``, ``"sum"`` returns ``Σ_n ℓ_n``
(the 1986 paper's total error over all cases), ``"none"`` returns the vector ``ℓ``.

The backward ``loss.backward(res, g)`` returns ``g · ∂value/∂pred``: for ``"mean"`` that is the
per-element derivative ``e'`` times ``g / (N K)``, with ``K`` the number of values averaged per
example; for ``"none"``, ``g`` has shape ``(N,)``.

Kinks follow JAX's ``grad`` of the same forward: MAE's derivative at ``pred == target`` is
**+1** (JAX's ``grad(jnp.abs)(0.) == 1``); Huber at ``|pred - target| == delta`` takes the
quadratic branch (both branches have slope ``±delta`` there); Hinge's and MulticlassHinge's
``max(0, m)`` is written ``where(m > 0, m, 0)``, so the derivative **at the margin is 0**.
Probabilities are clipped to ``[eps, 1 - eps]`` (``eps = 1e-7``) before their log; outside
that range the derivative is 0, as JAX's ``grad`` gives for the clipped expression.

**Bad values.** Each loss knows its conventions: integer labels in ``[0, C)``, probabilities
and binary targets in ``[0, 1]``, hinge labels in ``{-1, +1}``, one-hot rows for the
multiclass hinge, non-negative soft targets. On concrete arrays (outside ``jit``) a value
that breaks them raises ``InputError`` naming the first bad entry and the fix.
Under ``jit``/``vmap`` values cannot be inspected at trace time, so an example with a bad
target or prediction gets a **NaN** loss (and NaN gradients) instead of a silent wrong number:
``fbp.train.fit`` then stops with a ``stop_reason`` (and it validates every target before
training anyway). ``check_target`` runs the target checks alone, e.g. on a whole data set.
An empty batch raises (its mean would be NaN).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fbp.core import REDUCTIONS, InputError, Loss, describe, is_concrete, require_floating

EPS = 1e-7


# --------------------------------------------------------------------------- shared plumbing
def _reduce(values, reduction):
    """``values`` (N, ...) -> per-example means over the non-batch axes -> reduction."""
    per_example = values.reshape(values.shape[0], -1).mean(axis=1) if values.ndim > 1 else values
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def _weight(g, shape, reduction, dtype):
    """``g · ∂value/∂values[n, ...]``, broadcastable to ``shape``."""
    per_example = math.prod(shape[1:])
    g = jnp.asarray(g, dtype)
    if reduction == "mean":
        return g / (shape[0] * per_example)
    if reduction == "sum":
        return g / per_example
    if g.shape != (shape[0],):
        raise ValueError(f"reduction='none': backward needs g of shape ({shape[0]},), one per example, "
                         f"received {describe(g)}")
    return g.reshape((shape[0],) + (1,) * (len(shape) - 1)) / per_example


def _clip_probability(p):
    """``p`` clipped to ``[EPS, 1 - EPS]``, written with ``where`` so JAX's ``grad`` is 1 inside."""
    return jnp.where(p < EPS, EPS, jnp.where(p > 1 - EPS, 1 - EPS, p))


def _inside_clip(p):
    return (p >= EPS) & (p <= 1 - EPS)


def _relu(m):
    """``max(0, m)`` as ``where(m > 0, m, 0 · m)``: JAX's derivative is 0 at the margin, and a NaN
    ``m`` (a target poisoned under jit) stays NaN instead of becoming 0."""
    return jnp.where(m > 0, m, 0 * m)


class _Base(Loss):
    """What training needs to know of a loss is declared here, not looked up by type:

    * ``classification``: whether ``fit`` and ``evaluate`` record accuracy for it;
    * ``class_axis``: whether the last axis of a float target is the class axis (one-hot or soft
      rows), so one prediction is counted per row rather than per entry;
    * ``score_threshold`` / ``label_threshold``: for a single output, a prediction counts as
      positive above ``score_threshold`` (0 for logits and hinge scores, 0.5 for probabilities)
      and a target above ``label_threshold`` (0 for ±1 labels, 0.5 for {0, 1}).
    """

    classification = False
    class_axis = False
    score_threshold = 0.5
    label_threshold = 0.5

    def __post_init__(self):
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, got {self.reduction!r}")

    def _check_pred(self, pred, min_rank=1):
        require_floating(repr(self), pred, what="prediction")
        if pred.ndim < min_rank:
            shape = "(N, ...)" if min_rank == 1 else "(N, ..., classes)"
            raise InputError(repr(self), f"prediction needs a batch axis {shape}, received {describe(pred)}; "
                                         f"for a single example add one with x[None]")
        if pred.shape[0] == 0:
            raise InputError(repr(self), f"the batch is empty: prediction {describe(pred)} (the mean over no "
                                         f"examples is NaN)")

    def check_target(self, target, pred_shape) -> None:
        """Raise ``InputError`` if ``target`` cannot go with predictions of ``pred_shape``
        (shape, dtype, and — for concrete arrays — the loss's value conventions)."""
        self._target(jax.ShapeDtypeStruct(tuple(pred_shape), jnp.float32), target)

    def _values_ok(self, valid, values, what: str, fix: str):
        """``None`` when ``valid`` (a boolean array) is concrete and all True — raise naming the
        first bad entry when it is not; under jit return ``valid`` for ``_poison``."""
        if not is_concrete(valid):
            return valid
        valid = np.asarray(valid)
        if not valid.all():
            bad = np.argwhere(~valid)
            index = tuple(int(i) for i in bad[0])
            found = f"found {np.asarray(values)[index]} at" if is_concrete(values) else "a bad value at"
            raise InputError(repr(self), f"{what}; {found} index {index} ({len(bad)} such entries in all). {fix}")
        return None

    def _same_shape(self, pred, target):
        """Check and cast an elementwise target: same shape as the prediction."""
        self._check_pred(pred)
        if not hasattr(target, "shape") or tuple(target.shape) != tuple(pred.shape):
            raise InputError(repr(self), f"target must have the prediction's shape {tuple(pred.shape)}, "
                                         f"received {describe(target)} (prediction {describe(pred)})")
        return jnp.asarray(target).astype(pred.dtype)

    def _target(self, pred, target):
        return self._same_shape(pred, target)

    def _class_target(self, pred, target):
        """One-hot/soft target of pred's shape, or integer labels of shape pred.shape[:-1];
        out-of-range labels raise on concrete input and give a NaN target row under jit."""
        self._check_pred(pred, min_rank=2)
        shape = tuple(getattr(target, "shape", ()))
        classes = pred.shape[-1]
        if hasattr(target, "dtype") and jnp.issubdtype(target.dtype, jnp.integer) and shape == tuple(pred.shape[:-1]):
            ok = self._values_ok((target >= 0) & (target < classes), target,
                                 f"integer labels must lie in [0, {classes}) for {classes} classes (the last "
                                 f"axis of the prediction {describe(pred)})",
                                 "Check the labels, or give the model's last layer one output per class")
            t = jax.nn.one_hot(target, classes, dtype=pred.dtype)
            return t if ok is None else _poison(t, ok[..., None])
        if shape != tuple(pred.shape) or not jnp.issubdtype(getattr(target, "dtype", jnp.int32), jnp.floating):
            raise InputError(repr(self), f"target must be one-hot/probabilities of the prediction's shape "
                                         f"{tuple(pred.shape)} or integer labels of shape {tuple(pred.shape[:-1])}, "
                                         f"received {describe(target)}")
        return jnp.asarray(target).astype(pred.dtype)

    def _probabilities_ok(self, pred, t):
        """For ``from_logits=False``: predictions must be probabilities in [0, 1]."""
        ok = self._values_ok((pred >= 0) & (pred <= 1), pred, "with from_logits=False the predictions must be "
                             "probabilities in [0, 1]", "End the model with Sigmoid/Softmax, or pass raw scores "
                             "with from_logits=True (recommended: fused and stable)")
        return t if ok is None else _poison(t, ok)


def _poison(t, ok):
    """``t`` with NaN where ``ok`` is False (broadcast): under jit a bad value makes the loss NaN."""
    return jnp.where(ok, t, jnp.nan).astype(t.dtype)


# --------------------------------------------------------------------------- regression
@dataclasses.dataclass(frozen=True)
class MSE(_Base):
    """Mean squared error: ``e = (p - t)²``;  ``∂e/∂p = 2 (p - t)``."""

    reduction: str = "mean"

    def forward(self, pred, target):
        diff = pred - self._same_shape(pred, target)
        return _reduce(diff * diff, self.reduction), diff

    def backward(self, res, g=1.0):
        diff = res
        return 2 * diff * _weight(g, diff.shape, self.reduction, diff.dtype)


@dataclasses.dataclass(frozen=True)
class MAE(_Base):
    """Mean absolute error: ``e = |p - t|``;  ``∂e/∂p = +1 if p >= t else -1`` (+1 at 0, as jax)."""

    reduction: str = "mean"

    def forward(self, pred, target):
        diff = pred - self._same_shape(pred, target)
        return _reduce(jnp.abs(diff), self.reduction), diff

    def backward(self, res, g=1.0):
        diff = res
        return jnp.where(diff >= 0, 1, -1).astype(diff.dtype) * _weight(g, diff.shape, self.reduction, diff.dtype)


@dataclasses.dataclass(frozen=True)
class Huber(_Base):
    """Huber (1964): with ``r = p - t``, ``e = ½ r²`` if ``|r| <= δ`` else ``δ (|r| - ½ δ)``.

    ``∂e/∂p = r`` if ``|r| <= δ`` else ``δ sign(r)`` — i.e. ``clip(r, -δ, δ)``; continuous at
    ``|r| = δ``, where the quadratic branch is taken.
    """

    delta: float = 1.0
    reduction: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if not self.delta > 0:
            raise ValueError(f"Huber: delta must be > 0, got {self.delta}")

    def forward(self, pred, target):
        r = pred - self._same_shape(pred, target)
        abs_r = jnp.abs(r)
        e = jnp.where(abs_r <= self.delta, 0.5 * r * r, self.delta * (abs_r - 0.5 * self.delta))
        return _reduce(e, self.reduction), r

    def backward(self, res, g=1.0):
        r = res
        d_e = jnp.where(jnp.abs(r) <= self.delta, r, self.delta * jnp.sign(r))
        return d_e * _weight(g, r.shape, self.reduction, r.dtype)


# --------------------------------------------------------------------------- binary classification
@dataclasses.dataclass(frozen=True)
class BinaryCrossEntropy(_Base):
    """Binary cross-entropy with targets ``t`` in [0, 1].

    ``from_logits=True`` (recommended): ``z`` are logits and, fused with the sigmoid,
    ``e = softplus(z) - t z`` (``softplus(z) = logaddexp(z, 0)``: finite at |z| = 1e4), with
    ``∂e/∂z = σ(z) - t``.

    ``from_logits=False``: ``p`` are probabilities, clipped to ``[eps, 1-eps]``;
    ``e = -(t log p + (1-t) log(1-p))`` and ``∂e/∂p = (p - t) / (p (1 - p))`` inside the clip.
    """

    from_logits: bool = False
    reduction: str = "mean"
    classification = True

    @property
    def score_threshold(self) -> float:
        return 0.0 if self.from_logits else 0.5

    def _target(self, pred, target):
        t = self._same_shape(pred, target)
        ok = self._values_ok((t >= 0) & (t <= 1), t, "binary targets must lie in [0, 1]",
                             "For labels in {-1, +1} use (y + 1) / 2, or the Hinge loss")
        return t if ok is None else _poison(t, ok)

    def forward(self, pred, target):
        t = self._target(pred, target)
        if not self.from_logits:
            t = self._probabilities_ok(pred, t)
        if self.from_logits:
            e = jnp.logaddexp(pred, jnp.zeros_like(pred)) - t * pred
        else:
            p = _clip_probability(pred)
            e = -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))
        return _reduce(e, self.reduction), (pred, t)

    def backward(self, res, g=1.0):
        pred, t = res
        if self.from_logits:
            d_e = jax.nn.sigmoid(pred) - t
        else:
            p = _clip_probability(pred)
            d_e = jnp.where(_inside_clip(pred), (1 - t) / (1 - p) - t / p, 0 * t)  # 0 * t: a NaN target stays NaN
        return d_e * _weight(g, pred.shape, self.reduction, pred.dtype)


@dataclasses.dataclass(frozen=True)
class Hinge(_Base):
    """Hinge loss for labels ``t ∈ {-1, +1}``: ``e = max(0, 1 - t p)``.

    ``∂e/∂p = -t`` where ``1 - t p > 0``, else 0 (0 exactly at the margin ``t p = 1``).
    """

    reduction: str = "mean"
    classification = True
    score_threshold = 0.0
    label_threshold = 0.0

    def _target(self, pred, target):
        t = self._same_shape(pred, target)
        ok = self._values_ok((t == 1) | (t == -1), t, "hinge labels must be -1 or +1",
                             "Convert labels y in {0, 1} with 2 * y - 1")
        return t if ok is None else _poison(t, ok)

    def forward(self, pred, target):
        t = self._target(pred, target)
        m = 1 - t * pred
        return _reduce(_relu(m), self.reduction), (t, m > 0)

    def backward(self, res, g=1.0):
        t, active = res
        return jnp.where(active, -t, 0 * t) * _weight(g, t.shape, self.reduction, t.dtype)


# --------------------------------------------------------------------------- multiclass
@dataclasses.dataclass(frozen=True)
class CategoricalCrossEntropy(_Base):
    """Cross-entropy ``c = -Σ_k t_k log q_k`` over the last (class) axis.

    Targets: one-hot or soft (non-negative) probabilities of the prediction's shape, or integer
    labels of shape ``pred.shape[:-1]`` in ``[0, C)`` (see the module's "Bad values").

    ``from_logits=True`` (recommended): ``log q = log_softmax(z)`` computed by log-sum-exp,
    fused, so ``∂c/∂z = softmax(z) Σ_k t_k - t`` (``= softmax(z) - t`` for one-hot targets).

    ``from_logits=False``: ``q = clip(p, eps, 1-eps)`` and ``∂c/∂p = -t / q`` inside the clip.
    """

    from_logits: bool = False
    reduction: str = "mean"
    classification = True
    class_axis = True

    def _target(self, pred, target):
        t = self._class_target(pred, target)
        if jnp.issubdtype(getattr(target, "dtype", jnp.int32), jnp.floating):
            ok = self._values_ok(t >= 0, t, "soft targets must be non-negative (probabilities)",
                                 "Pass one-hot rows, probabilities, or integer labels")
            t = t if ok is None else _poison(t, ok)
        return t

    def forward(self, pred, target):
        t = self._target(pred, target)
        if not self.from_logits:
            t = self._probabilities_ok(pred, t)
        if self.from_logits:
            shifted = pred - lax.stop_gradient(pred.max(axis=-1, keepdims=True))
            log_q = shifted - jnp.log(jnp.exp(shifted).sum(axis=-1, keepdims=True))
            res = (log_q, t)
        else:
            log_q = jnp.log(_clip_probability(pred))
            res = (pred, t)
        return _reduce(-(t * log_q).sum(axis=-1), self.reduction), res

    def backward(self, res, g=1.0):
        aux, t = res
        if self.from_logits:
            d_c = jnp.exp(aux) * t.sum(axis=-1, keepdims=True) - t
        else:
            d_c = jnp.where(_inside_clip(aux), -t / _clip_probability(aux), 0 * t)
        return d_c * _weight(g, t.shape[:-1], self.reduction, t.dtype)[..., None]


@dataclasses.dataclass(frozen=True)
class MulticlassHinge(_Base):
    """Multiclass SVM loss (Weston & Watkins, 1999; as in CS231n), summed over wrong classes.

    With scores ``z``, correct-class score ``z_y = Σ_k t_k z_k`` and margins
    ``m_j = z_j - z_y + 1``: ``c = Σ_j (1 - t_j) max(0, m_j)``.
    With ``a_j = (1 - t_j) [m_j > 0]``: ``∂c/∂z_j = a_j - t_j Σ_k a_k``.
    Targets as for ``CategoricalCrossEntropy`` (one-hot or integer labels).
    """

    reduction: str = "mean"
    classification = True
    class_axis = True

    def _target(self, pred, target):
        t = self._class_target(pred, target)
        if jnp.issubdtype(getattr(target, "dtype", jnp.int32), jnp.floating):
            row_ok = jnp.all((t == 0) | (t == 1), axis=-1) & (t.sum(axis=-1) == 1)
            ok = self._values_ok(row_ok, t.sum(axis=-1), "targets must be one-hot rows (a single 1, the rest 0); "
                                 "a row that is not sums to the value shown",
                                 "Pass integer labels, or one-hot rows")
            t = t if ok is None else _poison(t, ok[..., None])
        return t

    def forward(self, pred, target):
        t = self._target(pred, target)
        m = pred - (t * pred).sum(axis=-1, keepdims=True) + 1
        c = ((1 - t) * _relu(m)).sum(axis=-1)
        return _reduce(c, self.reduction), (t, m > 0)

    def backward(self, res, g=1.0):
        t, active = res
        a = jnp.where(active, 1 - t, 0 * t)
        d_c = a - t * a.sum(axis=-1, keepdims=True)
        return d_c * _weight(g, t.shape[:-1], self.reduction, t.dtype)[..., None]


__all__ = ["MAE", "MSE", "BinaryCrossEntropy", "CategoricalCrossEntropy", "Hinge", "Huber", "Loss",
           "MulticlassHinge"]
