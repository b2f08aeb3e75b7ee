"""Cotangent hooks: layers whose forward is the identity and whose backward changes ``d_y``.

They deviate from JAX's gradient **by design** (``deviation`` says how). Each has a
``reference_apply`` — a plain ``jax.numpy`` function with the same value whose JAX gradient is
the rule — so ``fbp.check`` verifies the rule against its own equation, and names the path
as deviating when it checks a whole model.

* ``MapCotangent(fn)``:        ``y = x``,  ``d_x = fn(d_y)``  (any pure map keeping shape and dtype)
* ``ScaleGradient(factor)``:   ``y = x``,  ``d_x = factor · d_y``
* ``GradientReversal(scale)``: ``y = x``,  ``d_x = -scale · d_y``  (Ganin & Lempitsky, 2015:
  the feature extractor *maximises* the loss of the head above it — domain-adversarial training)
* ``StopGradient()``:          ``y = x``,  ``d_x = 0``

The references use ``x + (g - 1)(x - stop_gradient(x))``, whose value is exactly ``x`` and
whose derivative is ``g``.

References:
    Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp

from fbp.core import NO_RESIDUAL, InputError, ParameterFree, describe, require_number
from fbp.validation import check_fields

_F32_MAX = float(jnp.finfo(jnp.float32).max)  # a factor beyond it overflows a float32 cotangent


def _scaled_identity(x, g):
    """Value ``x``, JAX derivative ``g`` (the reference for the linear hooks)."""
    return x + (g - 1) * (x - jax.lax.stop_gradient(x))


class _LinearHook(ParameterFree):
    """``y = x``, ``d_x = g · d_y`` with ``g = self._factor()``."""

    deviation: ClassVar[str] = ""
    self_adjoint = True  # d_x = g d_y: the tangent is the backward, the rule's own transpose (fbp.linear_pass)

    def _factor(self) -> float:
        raise NotImplementedError

    def _forward(self, x):
        return x, NO_RESIDUAL

    def _backward(self, res, d_y):
        return (self._factor() * d_y).astype(d_y.dtype)

    def exact_backward(self, res, d_y):
        """The true derivative of the identity (for alignment angles in ``fbp.telemetry``)."""
        return {}, d_y

    def reference_apply(self, params, x, **context):
        return _scaled_identity(x, self._factor())


@dataclasses.dataclass(frozen=True)
class ScaleGradient(_LinearHook):
    """Identity forward; ``d_x = factor · d_y`` (e.g. a smaller learning rate for the layers below).

    Args:
        factor: the input cotangent is ``factor · d_y`` (the forward is the identity).
    """
    independent_examples = True  # each example's output and input cotangent are its own

    factor: float = 1.0
    deviation: ClassVar[str] = "identity forward, d_x = factor * d_y"

    def __post_init__(self):
        check_fields(self)
        require_number("ScaleGradient", "factor", self.factor, low=-_F32_MAX, high=_F32_MAX)

    def _factor(self):
        return self.factor


@dataclasses.dataclass(frozen=True)
class GradientReversal(_LinearHook):
    """Identity forward; ``d_x = -scale · d_y`` (Ganin & Lempitsky, 2015).

    Put it between a feature extractor and a domain classifier: the classifier learns to tell the
    domains apart while the features below learn to make them indistinguishable.

    Args:
        scale: ``λ``: the input cotangent is ``-λ d_y`` (Ganin & Lempitsky, 2015).
    """
    independent_examples = True  # each example's output and input cotangent are its own

    scale: float = 1.0
    deviation: ClassVar[str] = "identity forward, d_x = -scale * d_y (gradient reversal)"

    def __post_init__(self):
        check_fields(self)
        require_number("GradientReversal", "scale", self.scale, low=0)

    def _factor(self):
        return -self.scale


@dataclasses.dataclass(frozen=True)
class StopGradient(_LinearHook):
    """Identity forward; ``d_x = 0`` — nothing below learns from the loss above."""
    independent_examples = True  # each example's output and input cotangent are its own

    deviation: ClassVar[str] = "identity forward, d_x = 0"

    def _factor(self):
        return 0.0

    def _backward(self, res, d_y):
        return jnp.zeros_like(d_y)

    self_adjoint = True  # the zero map: the tangent (fbp.linear_pass) is zero too

    def reference_apply(self, params, x, **context):
        return jax.lax.stop_gradient(x)

    def __repr__(self) -> str:
        return "StopGradient()"


@dataclasses.dataclass(frozen=True)
class MapCotangent(ParameterFree):
    """Identity forward; ``d_x = fn(d_y)`` for a pure ``fn`` that keeps the shape and dtype.

    Examples: ``MapCotangent(lambda g: jnp.clip(g, -1, 1), name="clip")`` clips the cotangent per
    entry; ``MapCotangent(lambda g: g / (jnp.linalg.norm(g) + 1e-8))`` normalises it. ``fn`` is
    traced once on the output's shape when the forward runs, so a ``fn`` that changes the shape
    or the dtype raises ``InputError`` naming this layer's path before anything runs.

    Args:
        fn: ``d_y -> d_x``, a pure jnp function of the output cotangent.
        name: how the hook prints in reports and errors.
    """

    fn: Callable
    name: str = "MapCotangent"
    deviation: ClassVar[str] = "identity forward, d_x = fn(d_y)"

    def __post_init__(self):
        check_fields(self)
        if not callable(self.fn):
            raise TypeError(f"MapCotangent: fn must be callable, got {type(self.fn).__name__}")

    def __repr__(self) -> str:
        return f"MapCotangent(name={self.name!r})"

    def _forward(self, x):
        self._require_same(jax.ShapeDtypeStruct(x.shape, x.dtype))
        return x, NO_RESIDUAL

    def _backward(self, res, d_y):
        return self._require_same(d_y, self.fn(d_y))

    def _require_same(self, d_y, d_x=None):
        out = jax.eval_shape(self.fn, d_y) if d_x is None else d_x
        if getattr(out, "shape", None) != d_y.shape or getattr(out, "dtype", None) != d_y.dtype:
            raise InputError(repr(self), f"fn must return a cotangent shaped like its input: for d_y {describe(d_y)} "
                                         f"it returns {describe(out)}")
        return out

    def exact_backward(self, res, d_y):
        return {}, d_y

    def reference_apply(self, params, x, **context):
        @jax.custom_vjp
        def hook(v):
            return v

        hook.defvjp(lambda v: (v, None), lambda _, g: (self.fn(g),))
        return hook(x)
