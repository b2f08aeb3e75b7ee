"""The shared plumbing of every loss: reductions, target checks, the curvature factors' defaults
(``fbp.losses`` has the conventions)."""


from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import REDUCTIONS, InputError, Loss, describe, is_concrete, require_floating
from fbp.validation import check_fields

EPS = 1e-7


# --------------------------------------------------------------------------- shared plumbing
def reduce_values(values, reduction):
    """Reduce elementwise loss values: per-example means over the non-batch axes, then the reduction.

    Args:
        values: ``(N, ...)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``(N,)`` for ``"none"``.
    """
    per_example = values.reshape(values.shape[0], -1).mean(axis=1) if values.ndim > 1 else values
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def reduction_weight(g, shape, reduction, dtype):
    """``g · ∂value/∂values[n, ...]``: how the reduction weighs each element in the backward.

    Args:
        g: the cotangent of the loss's value (a scalar, or ``(N,)`` for ``"none"``).
        shape: the elementwise values' shape ``(N, ...)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        dtype: the dtype of the result.

    Returns:
        An array broadcastable to ``shape``.

    Raises:
        ValueError: ``reduction="none"`` with a ``g`` that is not one value per example.
    """
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


def clip_probability(p):
    """``p`` clipped to ``[EPS, 1 - EPS]``, written with ``where`` so JAX's ``grad`` is 1 inside.

    Args:
        p: probabilities.

    Returns:
        The clipped probabilities.
    """
    return jnp.where(p < EPS, EPS, jnp.where(p > 1 - EPS, 1 - EPS, p))


def inside_clip(p):
    """Where ``clip_probability`` passes its input through (the derivative there is 1, else 0).

    Args:
        p: probabilities.

    Returns:
        Booleans, ``EPS <= p <= 1 - EPS``.
    """
    return (p >= EPS) & (p <= 1 - EPS)


def margin_relu(m):
    """``max(0, m)`` as ``where(m > 0, m, 0 · m)``.

    JAX's derivative is 0 at the margin, and a NaN ``m`` (a target poisoned under jit) stays NaN
    instead of becoming 0.

    Args:
        m: margins.

    Returns:
        The hinge of the margins.
    """
    return jnp.where(m > 0, m, 0 * m)


class LossBase(Loss):
    """What training needs to know of a loss is declared here, not looked up by type:

    * ``classification``: whether ``fit`` and ``evaluate`` record accuracy for it;
    * ``class_axis``: whether the last axis of a float target is the class axis (one-hot or soft
      rows), so one prediction is counted per row rather than per entry;
    * ``score_threshold`` / ``label_threshold``: for a single output, a prediction counts as
      positive above ``score_threshold`` (0 for logits and hinge scores, 0.5 for probabilities)
      and a target above ``label_threshold`` (0 for ±1 labels, 0.5 for {0, 1});
    * ``likelihood``: the likelihood the loss is the negative log of, for ``fbp.laplace`` and
      ``fbp.influence`` — ``"classification"`` (softmax on logits), ``"binary"`` (sigmoid on
      logits), ``"regression"`` (Gaussian) or ``None``.
    """

    classification = False
    likelihood = None
    class_axis = False
    score_threshold = 0.5
    label_threshold = 0.5

    def __post_init__(self):
        check_fields(self)
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
        if math.prod(pred.shape) == 0:
            raise InputError(repr(self), f"the prediction {describe(pred)} has no entries (a sequence of length 0, "
                                         f"or no classes): the mean over nothing is NaN")

    def check_target(self, target, pred_shape) -> None:
        """Raise ``InputError`` if ``target`` cannot go with predictions of ``pred_shape``
        (shape, dtype, and — for concrete arrays — the loss's value conventions)."""
        self._target(jax.ShapeDtypeStruct(tuple(pred_shape), jnp.float32), target)

    def _values_ok(self, valid, values, what: str, fix: str):
        """``None`` when ``valid`` (a boolean array) is concrete and all True — raise naming the
        first bad entry when it is not; under jit return ``valid`` for ``poison``."""
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
            return t if ok is None else poison(t, ok[..., None])
        if shape != tuple(pred.shape) or not jnp.issubdtype(getattr(target, "dtype", jnp.int32), jnp.floating):
            raise InputError(repr(self), f"target must be one-hot/probabilities of the prediction's shape "
                                         f"{tuple(pred.shape)} or integer labels of shape {tuple(pred.shape[:-1])}, "
                                         f"received {describe(target)}")
        return jnp.asarray(target).astype(pred.dtype)

    # ----------------------------------------------------------------- curvature (fbp.curvature)
    def hessian_factor(self, pred, target):
        """``S`` of shape ``(*pred.shape, M)`` with ``Σ_m S_n[…, m] S_n[…, m]ᵀ = ∂²value/∂pred_n²``
        for every example ``n`` (``value`` the reduced loss; ``"none"`` counts as ``"sum"``).
        A loss whose Hessian is diagonal (every elementwise loss) has ``M = pred.size / N``
        columns ``√h_k e_k``, from the second derivative ``h = e''`` beside its backward."""
        h = self._hessian_diagonal(self.forward(pred, target)[1]) * self._scale(pred)
        k = math.prod(pred.shape[1:])
        s = jnp.sqrt(h).reshape(pred.shape[0], k)
        return (s[:, :, None] * jnp.eye(k, dtype=s.dtype)).reshape(*pred.shape, k)

    def sampled_hessian_factor(self, pred, target, key, samples: int = 1):
        """``S`` of shape ``(*pred.shape, samples)`` with ``E[S Sᵀ] = ∂²value/∂pred²`` (per example).
        Here ``√h ⊙ ε / √samples`` with Rademacher signs ``ε``; the likelihood losses (MSE,
        cross-entropy from logits) override it by sampling targets from the model's predictive
        distribution."""
        h = self._hessian_diagonal(self.forward(pred, target)[1]) * self._scale(pred)
        eps = jax.random.rademacher(key, (*pred.shape, samples), pred.dtype)
        return jnp.sqrt(h)[..., None] * eps / math.sqrt(samples)

    def _hessian_diagonal(self, res):
        """``e''`` elementwise, of the prediction's shape; 0 for piecewise-linear losses."""
        return jnp.zeros_like(jax.tree_util.tree_leaves(res)[0])

    def _scale(self, pred):
        """``∂value/∂e`` per element, broadcastable to ``pred`` (``1/(N K)`` for ``"mean"``)."""
        shape = pred.shape[:-1] if self.class_axis else pred.shape
        g = jnp.ones(pred.shape[0], pred.dtype) if self.reduction == "none" else 1.0
        w = reduction_weight(g, shape, self.reduction, pred.dtype)
        return w[..., None] if self.class_axis else w

    def _probabilities_ok(self, pred, t):
        """For ``from_logits=False``: predictions must be probabilities in [0, 1]."""
        ok = self._values_ok((pred >= 0) & (pred <= 1), pred, "with from_logits=False the predictions must be "
                             "probabilities in [0, 1]", "End the model with Sigmoid/Softmax, or pass raw scores "
                             "with from_logits=True (recommended: fused and stable)")
        return t if ok is None else poison(t, ok)


def poison(t, ok):
    """``t`` with NaN where ``ok`` is False (broadcast): under jit a bad target makes the loss NaN.

    Args:
        t: the targets.
        ok: booleans, broadcastable to ``t``.

    Returns:
        ``t``, poisoned where not ``ok``, in ``t``'s dtype.
    """
    return jnp.where(ok, t, jnp.nan).astype(t.dtype)


