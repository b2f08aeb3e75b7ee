"""Classification losses: binary cross-entropy, hinge, categorical cross-entropy, multiclass hinge."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from fbp.losses.base import (
    LossBase,
    clip_probability,
    inside_clip,
    margin_relu,
    poison,
    reduce_values,
    reduction_weight,
)


# --------------------------------------------------------------------------- binary classification
@dataclasses.dataclass(frozen=True)
class BinaryCrossEntropy(LossBase):
    """Binary cross-entropy with targets ``t`` in [0, 1].

    ``from_logits=True`` (recommended): ``z`` are logits and, fused with the sigmoid,
    ``e = softplus(z) - t z`` (``softplus(z) = logaddexp(z, 0)``: finite at |z| = 1e4), with
    ``∂e/∂z = σ(z) - t``.

    ``from_logits=False``: ``p`` are probabilities, clipped to ``[eps, 1-eps]``;
    ``e = -(t log p + (1-t) log(1-p))`` and ``∂e/∂p = (p - t) / (p (1 - p))`` inside the clip.

    Args:
        from_logits: predictions are logits (recommended) rather than probabilities.
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
    """

    from_logits: bool = False
    reduction: str = "mean"
    classification = True

    @property
    def score_threshold(self) -> float:
        return 0.0 if self.from_logits else 0.5

    @property
    def likelihood(self):
        return "binary" if self.from_logits else None

    def _target(self, pred, target):
        t = self._same_shape(pred, target)
        ok = self._values_ok((t >= 0) & (t <= 1), t, "binary targets must lie in [0, 1]",
                             "For labels in {-1, +1} use (y + 1) / 2, or the Hinge loss")
        return t if ok is None else poison(t, ok)

    def forward(self, pred, target):
        t = self._target(pred, target)
        if not self.from_logits:
            t = self._probabilities_ok(pred, t)
        if self.from_logits:
            e = jnp.logaddexp(pred, jnp.zeros_like(pred)) - t * pred
        else:
            p = clip_probability(pred)
            e = -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))
        return reduce_values(e, self.reduction), (pred, t)

    def backward(self, res, g=1.0):
        pred, t = res
        if self.from_logits:
            d_e = jax.nn.sigmoid(pred) - t
        else:
            p = clip_probability(pred)
            d_e = jnp.where(inside_clip(pred), (1 - t) / (1 - p) - t / p, 0 * t)  # 0 * t: a NaN target stays NaN
        return d_e * reduction_weight(g, pred.shape, self.reduction, pred.dtype)

    def _hessian_diagonal(self, res):
        """``σ(z)(1 - σ(z))`` from logits; ``t/p² + (1-t)/(1-p)²`` inside the clip from probabilities."""
        pred, t = res
        if self.from_logits:
            s = jax.nn.sigmoid(pred)
            return s * (1 - s)
        p = clip_probability(pred)
        return jnp.where(inside_clip(pred), t / (p * p) + (1 - t) / ((1 - p) * (1 - p)), 0 * t)

    def sampled_hessian_factor(self, pred, target, key, samples: int = 1):
        """From logits: labels ``t̂ ~ Bernoulli(σ(z))``, so ``σ(z) - t̂`` has variance ``σ(1 - σ)``."""
        if not self.from_logits:
            return super().sampled_hessian_factor(pred, target, key, samples)
        self.forward(pred, target)
        s = jax.nn.sigmoid(pred)[..., None]
        t_hat = jax.random.bernoulli(key, s, (*pred.shape, samples)).astype(pred.dtype)
        return jnp.sqrt(self._scale(pred))[..., None] * (s - t_hat) / math.sqrt(samples)


@dataclasses.dataclass(frozen=True)
class Hinge(LossBase):
    """Hinge loss for labels ``t ∈ {-1, +1}``: ``e = max(0, 1 - t p)``.

    ``∂e/∂p = -t`` where ``1 - t p > 0``, else 0 (0 exactly at the margin ``t p = 1``).

    Args:
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
    """

    reduction: str = "mean"
    classification = True
    score_threshold = 0.0
    label_threshold = 0.0

    def _target(self, pred, target):
        t = self._same_shape(pred, target)
        ok = self._values_ok((t == 1) | (t == -1), t, "hinge labels must be -1 or +1",
                             "Convert labels y in {0, 1} with 2 * y - 1")
        return t if ok is None else poison(t, ok)

    def forward(self, pred, target):
        t = self._target(pred, target)
        m = 1 - t * pred
        return reduce_values(margin_relu(m), self.reduction), (t, m > 0)

    def backward(self, res, g=1.0):
        t, active = res
        return jnp.where(active, -t, 0 * t) * reduction_weight(g, t.shape, self.reduction, t.dtype)


# --------------------------------------------------------------------------- multiclass
@dataclasses.dataclass(frozen=True)
class CategoricalCrossEntropy(LossBase):
    """Cross-entropy ``c = -Σ_k t_k log q_k`` over the last (class) axis.

    Targets: one-hot or soft (non-negative) probabilities of the prediction's shape, or integer
    labels of shape ``pred.shape[:-1]`` in ``[0, C)`` (see the module's "Bad values").

    ``from_logits=True`` (recommended): ``log q = log_softmax(z)`` computed by log-sum-exp,
    fused, so ``∂c/∂z = softmax(z) Σ_k t_k - t`` (``= softmax(z) - t`` for one-hot targets).

    ``from_logits=False``: ``q = clip(p, eps, 1-eps)`` and ``∂c/∂p = -t / q`` inside the clip.

    Args:
        from_logits: predictions are logits (recommended) rather than probabilities.
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
    """

    from_logits: bool = False
    reduction: str = "mean"
    classification = True
    class_axis = True

    @property
    def likelihood(self):
        return "classification" if self.from_logits else None

    def _target(self, pred, target):
        t = self._class_target(pred, target)
        if jnp.issubdtype(getattr(target, "dtype", jnp.int32), jnp.floating):
            ok = self._values_ok(t >= 0, t, "soft targets must be non-negative (probabilities)",
                                 "Pass one-hot rows, probabilities, or integer labels")
            t = t if ok is None else poison(t, ok)
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
            log_q = jnp.log(clip_probability(pred))
            res = (pred, t)
        return reduce_values(-(t * log_q).sum(axis=-1), self.reduction), res

    def backward(self, res, g=1.0):
        aux, t = res
        if self.from_logits:
            d_c = jnp.exp(aux) * t.sum(axis=-1, keepdims=True) - t
        else:
            d_c = jnp.where(inside_clip(aux), -t / clip_probability(aux), 0 * t)
        return d_c * reduction_weight(g, t.shape[:-1], self.reduction, t.dtype)[..., None]

    def _hessian_diagonal(self, res):  # from probabilities: c'' = t / q² inside the clip
        pred, t = res
        q = clip_probability(pred)
        return jnp.where(inside_clip(pred), t / (q * q), 0 * t)

    def hessian_factor(self, pred, target):
        """From logits the Hessian of ``c`` is ``s (diag(p) - p pᵀ)`` (``s = Σ_k t_k``, ``p`` the
        softmax), whose factor is ``√s (diag(√p) - p √pᵀ)`` (``Σ_k p_k = 1``); one column per
        (position, class), a position's columns zero at every other position."""
        if not self.from_logits:
            return super().hessian_factor(pred, target)
        log_q, t = self.forward(pred, target)[1]
        p = jnp.exp(log_q)
        root = jnp.sqrt(t.sum(axis=-1, keepdims=True) * self._scale(pred))[..., None]
        block = root * (jnp.sqrt(p)[..., None, :] * jnp.eye(p.shape[-1], dtype=p.dtype)
                        - p[..., :, None] * jnp.sqrt(p)[..., None, :])  # (..., class i, column c)
        n, c = pred.shape[0], pred.shape[-1]
        positions = math.prod(pred.shape[1:-1])
        block = block.reshape(n, positions, c, c)
        spread = jnp.einsum("ntic,tu->ntiuc", block, jnp.eye(positions, dtype=p.dtype))
        return spread.reshape(*pred.shape, positions * c)

    def sampled_hessian_factor(self, pred, target, key, samples: int = 1):
        """From logits: labels ``ŷ ~ Categorical(p)`` at every position, so ``p - onehot(ŷ)`` has
        covariance ``diag(p) - p pᵀ``; all positions share a column (their samples are independent)."""
        if not self.from_logits:
            return super().sampled_hessian_factor(pred, target, key, samples)
        log_q, t = self.forward(pred, target)[1]
        labels = jax.random.categorical(key, log_q[..., None, :], shape=(*pred.shape[:-1], samples))
        onehot = jax.nn.one_hot(labels, pred.shape[-1], dtype=pred.dtype)  # (..., samples, C)
        d = (jnp.exp(log_q)[..., None, :] - onehot).swapaxes(-1, -2)
        root = jnp.sqrt(t.sum(axis=-1, keepdims=True) * self._scale(pred))[..., None]
        return root * d / math.sqrt(samples)


@dataclasses.dataclass(frozen=True)
class MulticlassHinge(LossBase):
    """Multiclass SVM loss (Weston & Watkins, 1999; as in CS231n), summed over wrong classes.

    With scores ``z``, correct-class score ``z_y = Σ_k t_k z_k`` and margins
    ``m_j = z_j - z_y + 1``: ``c = Σ_j (1 - t_j) max(0, m_j)``.
    With ``a_j = (1 - t_j) [m_j > 0]``: ``∂c/∂z_j = a_j - t_j Σ_k a_k``.
    Targets as for ``CategoricalCrossEntropy`` (one-hot or integer labels).

    Args:
        reduction: ``"mean"`` (default) averages the per-example values over the batch, ``"sum"``
            adds them, ``"none"`` returns them.
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
            t = t if ok is None else poison(t, ok[..., None])
        return t

    def forward(self, pred, target):
        t = self._target(pred, target)
        m = pred - (t * pred).sum(axis=-1, keepdims=True) + 1
        c = ((1 - t) * margin_relu(m)).sum(axis=-1)
        return reduce_values(c, self.reduction), (t, m > 0)

    def backward(self, res, g=1.0):
        t, active = res
        a = jnp.where(active, 1 - t, 0 * t)
        d_c = a - t * a.sum(axis=-1, keepdims=True)
        return d_c * reduction_weight(g, t.shape[:-1], self.reduction, t.dtype)[..., None]


