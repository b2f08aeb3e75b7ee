"""Optimizers with optax's names, hyperparameters and defaults (so numbers carry over).

Each is a ``chain`` of the blocks in ``fbp.optim.transforms``; the equations are in
their docstrings.
"""

from __future__ import annotations

from typing import Any

from fbp.optim.base import GradientTransformation, chain, identity
from fbp.optim.transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
    trace,
)


def sgd(learning_rate: ScalarOrSchedule, momentum: float | None = None,
        nesterov: bool = False) -> GradientTransformation:
    """Stochastic gradient descent (Robbins & Monro, 1951), optionally with momentum (Polyak,
    1964) or Nesterov momentum (Sutskever et al., 2013).

    ``m ← μ m + g``;  ``θ ← θ - η m`` (or ``θ ← θ - η (g + μ m)`` with Nesterov); plain SGD
    ``θ ← θ - η g`` when ``momentum`` is None.
    """
    return chain(trace(momentum, nesterov) if momentum is not None else identity(),
                 scale_by_learning_rate(learning_rate))


def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> GradientTransformation:
    """AdaGrad (Duchi, Hazan & Singer, 2011): ``s ← s + g²``;  ``θ ← θ - η g / sqrt(s + eps)``."""
    return chain(scale_by_rss(initial_accumulator_value, eps), scale_by_learning_rate(learning_rate))


def rmsprop(learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
            eps_in_sqrt: bool = True, centered: bool = False, momentum: float | None = None, nesterov: bool = False,
            bias_correction: bool = False) -> GradientTransformation:
    """RMSProp (Tieleman & Hinton, 2012): ``ν ← ρ ν + (1-ρ) g²``;  ``θ ← θ - η g / sqrt(ν + eps)``.

    Follows optax: eps inside the square root by default (``eps_in_sqrt``); ``centered``
    divides by ``sqrt(ν - μ² + eps)`` (Graves, 2013); ``momentum`` is applied after the
    learning rate: ``m ← μ m + η g / sqrt(ν + eps)``, ``θ ← θ - m``.
    """
    scaling = scale_by_stddev if centered else scale_by_rms
    return chain(scaling(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
                 scale_by_learning_rate(learning_rate),
                 trace(momentum, nesterov) if momentum is not None else identity())


def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0, *, nesterov: bool = False) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015): ``θ ← θ - η m̂ / (sqrt(v̂ + eps_root) + eps)``; see ``scale_by_adam``."""
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov), scale_by_learning_rate(learning_rate))


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, weight_decay: float = 1e-4, mask: Any = None, *,
          nesterov: bool = False) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): decoupled weight decay,
    ``θ ← θ - η (m̂ / (sqrt(v̂ + eps_root) + eps) + λ θ)``."""
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))
