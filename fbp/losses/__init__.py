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

from fbp.core import Loss
from fbp.losses.classification import BinaryCrossEntropy, CategoricalCrossEntropy, Hinge, MulticlassHinge
from fbp.losses.regression import MAE, MSE, Huber

__all__ = ["MAE", "MSE", "BinaryCrossEntropy", "CategoricalCrossEntropy", "Hinge", "Huber", "Loss",
           "MulticlassHinge"]
