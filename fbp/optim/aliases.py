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
from fbp.validation import typed_arguments


@typed_arguments
def sgd(learning_rate: ScalarOrSchedule, momentum: float | None = None,
        nesterov: bool = False) -> GradientTransformation:
    """Stochastic gradient descent (Robbins & Monro, 1951), optionally with momentum (Polyak,
    1964) or Nesterov momentum (Sutskever et al., 2013).

    ``m ← μ m + g``;  ``θ ← θ - η m`` (or ``θ ← θ - η (g + μ m)`` with Nesterov); plain SGD
    ``θ ← θ - η g`` when ``momentum`` is None.

    Args:
        learning_rate: ``η``: a float, or a schedule ``step -> rate`` (``fbp.optim.*_schedule``).
        momentum: ``μ``; ``None`` (default) for plain SGD.
        nesterov: Nesterov's form of the momentum.

    Returns:
        A ``GradientTransformation``: ``init(params)`` and ``update(grads, state, params)``.
    """
    return chain(trace(momentum, nesterov) if momentum is not None else identity(),
                 scale_by_learning_rate(learning_rate))


@typed_arguments
def adagrad(learning_rate: ScalarOrSchedule, initial_accumulator_value: float = 0.1,
            eps: float = 1e-7) -> GradientTransformation:
    """AdaGrad (Duchi, Hazan & Singer, 2011): ``s ← s + g²``;  ``θ ← θ - η g / sqrt(s + eps)``.

    Args:
        learning_rate: ``η``: a float, or a schedule ``step -> rate`` (``fbp.optim.*_schedule``).
        initial_accumulator_value: the starting value of ``s`` (default 0.1, as optax).
        eps: added inside the square root.

    Returns:
        A ``GradientTransformation``: ``init(params)`` and ``update(grads, state, params)``.
    """
    return chain(scale_by_rss(initial_accumulator_value, eps), scale_by_learning_rate(learning_rate))


@typed_arguments
def rmsprop(learning_rate: ScalarOrSchedule, decay: float = 0.9, eps: float = 1e-8, initial_scale: float = 0.0,
            eps_in_sqrt: bool = True, centered: bool = False, momentum: float | None = None, nesterov: bool = False,
            bias_correction: bool = False) -> GradientTransformation:
    """RMSProp (Tieleman & Hinton, 2012): ``ν ← ρ ν + (1-ρ) g²``;  ``θ ← θ - η g / sqrt(ν + eps)``.

    Follows optax: eps inside the square root by default (``eps_in_sqrt``); ``centered``
    divides by ``sqrt(ν - μ² + eps)`` (Graves, 2013); ``momentum`` is applied after the
    learning rate: ``m ← μ m + η g / sqrt(ν + eps)``, ``θ ← θ - m``.

    Args:
        learning_rate: ``η``: a float, or a schedule ``step -> rate`` (``fbp.optim.*_schedule``).
        decay: ``ρ``, the moving average's decay.
        eps: the stabiliser added to ``ν``.
        initial_scale: ``ν₀``.
        eps_in_sqrt: add ``eps`` inside the square root (default, as optax) or outside it.
        centered: subtract the squared mean gradient (Graves, 2013).
        momentum: ``μ`` applied after the scaling; ``None`` for none.
        nesterov: Nesterov's form of that momentum.
        bias_correction: divide ``ν`` by ``1 - ρ^t``.

    Returns:
        A ``GradientTransformation``: ``init(params)`` and ``update(grads, state, params)``.
    """
    scaling = scale_by_stddev if centered else scale_by_rms
    return chain(scaling(decay, eps, initial_scale, eps_in_sqrt, bias_correction),
                 scale_by_learning_rate(learning_rate),
                 trace(momentum, nesterov) if momentum is not None else identity())


@typed_arguments
def adam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         eps_root: float = 0.0, *, nesterov: bool = False) -> GradientTransformation:
    """Adam (Kingma & Ba, 2015): ``θ ← θ - η m̂ / (sqrt(v̂ + eps_root) + eps)``; see ``scale_by_adam``.

    Args:
        learning_rate: ``η``: a float, or a schedule ``step -> rate`` (``fbp.optim.*_schedule``).
        b1: ``β₁``, the first moment's decay.
        b2: ``β₂``, the second moment's decay.
        eps: added to ``sqrt(v̂)``.
        eps_root: added inside the square root.
        nesterov: Nesterov momentum on the first moment (NAdam, Dozat 2016), as optax's ``nesterov``.

    Returns:
        A ``GradientTransformation``: ``init(params)`` and ``update(grads, state, params)``.
    """
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov), scale_by_learning_rate(learning_rate))


@typed_arguments
def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          eps_root: float = 0.0, weight_decay: float = 1e-4, mask: Any = None, *,
          nesterov: bool = False) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter, 2019): decoupled weight decay,
    ``θ ← θ - η (m̂ / (sqrt(v̂ + eps_root) + eps) + λ θ)``.

    Args:
        learning_rate: ``η``: a float, or a schedule ``step -> rate`` (``fbp.optim.*_schedule``).
        b1: ``β₁``.
        b2: ``β₂``.
        eps: added to ``sqrt(v̂)``.
        eps_root: added inside the square root.
        weight_decay: ``λ``, decoupled (scaled by ``η``, not by Adam's denominator).
        mask: a pytree of bools shaped like the params, or a function of the params returning one: which leaves
            decay (all by default).
        nesterov: Nesterov momentum on the first moment.

    Returns:
        A ``GradientTransformation``: ``init(params)`` and ``update(grads, state, params)``.
    """
    return chain(scale_by_adam(b1, b2, eps, eps_root, nesterov=nesterov), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))
