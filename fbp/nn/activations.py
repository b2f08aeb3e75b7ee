"""Activation layers, each forward with its hand-written backward right beneath it.

Every activation is parameter-free (params ``{}``, d_params ``{}``). For elementwise
``y = f(x)`` the backward is ``d_x = f'(x) * d_y``; written, where it is cheaper, in terms of
the saved output ``y`` (sigmoid, tanh, ReLU), so the residual is the array the next layer
keeps anyway. An elementwise Jacobian is diagonal, so forward mode (``fbp.linear_pass``) is the
backward itself (``self_adjoint``); softmax's is symmetric too; log-softmax writes ``_tangent``.

Conventions at kinks follow JAX's ``grad`` of the same ``jnp`` forward, so results agree
exactly:

* ``ReLU``: forward ``where(x > 0, x, 0)``; derivative **0 at x = 0** (as ``jax.nn.relu``).
* ``LeakyReLU``: forward ``where(x >= 0, x, slope * x)``; derivative **1 at x = 0**
  (as ``jax.nn.leaky_relu``).
* ``ELU``: forward ``where(x > 0, x, alpha * expm1(x))``; derivative **alpha at x = 0**.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import NO_RESIDUAL, ParameterFree, require_number
from fbp.validation import check_fields


class Activation(ParameterFree):
    """A parameter-free layer ``y = f(x)``; subclasses write ``_forward`` and ``_backward``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({fields})"


@dataclasses.dataclass(frozen=True, repr=False)
class Identity(Activation):
    """``y = x``;  ``d_x = d_y``."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    def _forward(self, x):
        return x, NO_RESIDUAL

    def _backward(self, res, d_y):
        return d_y

    piecewise_linear = True


@dataclasses.dataclass(frozen=True, repr=False)
class Sigmoid(Activation):
    """``y = 1 / (1 + e^{-x})``;  ``d_x = y (1 - y) d_y``."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    def _forward(self, x):
        y = jax.nn.sigmoid(x)
        return y, y

    def _backward(self, y, d_y):
        return y * (1 - y) * d_y

    def second_derivative(self, y):
        """``f'' = y (1 - y)(1 - 2y)`` (``fbp.curvature.diag_hessian``)."""
        return y * (1 - y) * (1 - 2 * y)


@dataclasses.dataclass(frozen=True, repr=False)
class Tanh(Activation):
    """``y = tanh x``;  ``d_x = (1 - y²) d_y``."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    def _forward(self, x):
        y = jnp.tanh(x)
        return y, y

    def _backward(self, y, d_y):
        return (1 - y * y) * d_y

    def second_derivative(self, y):
        """``f'' = -2 y (1 - y²)``."""
        return -2 * y * (1 - y * y)


@dataclasses.dataclass(frozen=True, repr=False)
class ReLU(Activation):
    """``y = max(x, 0)``;  ``d_x = [y > 0] d_y`` (0 at x = 0, as ``jax.nn.relu``)."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    def _forward(self, x):
        y = jnp.where(x > 0, x, jnp.zeros_like(x))
        return y, y

    def _backward(self, y, d_y):
        return jnp.where(y > 0, d_y, jnp.zeros_like(d_y))

    piecewise_linear = True


@dataclasses.dataclass(frozen=True, repr=False)
class LeakyReLU(Activation):
    """``y = x if x >= 0 else a x``;  ``d_x = (1 if x >= 0 else a) d_y`` (1 at x = 0).

    Args:
        negative_slope: the slope ``a`` for ``x < 0`` (default 0.01).
    """
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    negative_slope: float = 0.01

    def __post_init__(self):
        check_fields(self)
        require_number("LeakyReLU", "negative_slope", self.negative_slope)

    def _forward(self, x):
        return jnp.where(x >= 0, x, self.negative_slope * x), x

    def _backward(self, x, d_y):
        return jnp.where(x >= 0, d_y, self.negative_slope * d_y)

    piecewise_linear = True


@dataclasses.dataclass(frozen=True, repr=False)
class ELU(Activation):
    """``y = x if x > 0 else α (e^x - 1)``;  ``d_x = (1 if x > 0 else α e^x) d_y``.

    Args:
        alpha: ``α``, the value approached as ``x → -∞`` is ``-α`` (default 1).
    """
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    alpha: float = 1.0

    def __post_init__(self):
        check_fields(self)
        require_number("ELU", "alpha", self.alpha)

    def _forward(self, x):
        negative = self.alpha * jnp.expm1(jnp.where(x > 0, jnp.zeros_like(x), x))
        return jnp.where(x > 0, x, negative), x

    def _backward(self, x, d_y):
        return jnp.where(x > 0, d_y, self.alpha * jnp.exp(jnp.where(x > 0, jnp.zeros_like(x), x)) * d_y)

    def second_derivative(self, x):
        """``f'' = 0 if x > 0 else α e^x``."""
        return jnp.where(x > 0, jnp.zeros_like(x), self.alpha * jnp.exp(jnp.where(x > 0, jnp.zeros_like(x), x)))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


@dataclasses.dataclass(frozen=True, repr=False)
class GELU(Activation):
    """Gaussian error linear unit (Hendrycks & Gimpel, 2016).

    Exact: ``y = x Φ(x)``;  ``d_x = (Φ(x) + x φ(x)) d_y``, with ``Φ(x) = ½ erfc(-x/√2)``.

    Approximate (default, as ``jax.nn.gelu``): with ``u = √(2/π) (x + 0.044715 x³)`` and
    ``t = tanh u``, ``y = ½ x (1 + t)`` and
    ``d_x = (½ (1 + t) + ½ x (1 - t²) u') d_y``, ``u' = √(2/π) (1 + 3·0.044715 x²)``.

    The residual is ``x`` alone. The backward evaluates the gate through a *different* function
    than the forward — ``s = σ(2u)``, so ``½ (1 + t) = s`` and ``½ (1 - t²) = 2 s (1 - s)``; for the
    exact form ``Φ`` via ``erf`` instead of ``erfc`` — because XLA merges a recomputation that is
    written identically with the forward's value and keeps that ``(B, T, mlp_dim)`` array alive
    until the backward (the Performance page has the measurement).

    Args:
        approximate: the tanh approximation (default, as ``jax.nn.gelu``) or the exact ``x Φ(x)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    approximate: bool = True

    def _forward(self, x):
        return x * self._gate(x), x

    def _gate(self, x):
        """``½ (1 + t)`` (approximate) or ``Φ(x)`` (exact)."""
        if self.approximate:
            return 0.5 * (1 + jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3)))
        return 0.5 * lax.erfc(-x / math.sqrt(2.0))

    def _backward(self, x, d_y):
        if self.approximate:
            s = jax.nn.sigmoid(2 * _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
            du_dx = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
            return (s + 2 * x * s * (1 - s) * du_dx) * d_y
        pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return (0.5 * (1 + lax.erf(x / math.sqrt(2.0))) + x * pdf) * d_y

    def second_derivative(self, x):
        """Exact: ``f'' = φ(x)(2 - x²)``. Approximate, with the gate ``h = σ(2u)``:
        ``f'' = 2h' + x h''``, ``h' = 2 s(1-s) u'``, ``h'' = 4 s(1-s)(1-2s) u'² + 2 s(1-s) u''``."""
        if self.approximate:
            s = jax.nn.sigmoid(2 * _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
            du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
            ddu = _SQRT_2_OVER_PI * 6 * _GELU_CUBIC * x
            ds = s * (1 - s)
            return 4 * ds * du + x * (4 * ds * (1 - 2 * s) * du * du + 2 * ds * ddu)
        return jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) * (2 - x * x)


@dataclasses.dataclass(frozen=True, repr=False)
class Softplus(Activation):
    """``y = log(1 + e^x)`` (as ``logaddexp(x, 0)``, stable);  ``d_x = σ(x) d_y``."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    def _forward(self, x):
        return jnp.logaddexp(x, jnp.zeros_like(x)), x

    def _backward(self, x, d_y):
        return jax.nn.sigmoid(x) * d_y

    def second_derivative(self, x):
        """``f'' = σ(x)(1 - σ(x))``."""
        s = jax.nn.sigmoid(x)
        return s * (1 - s)


@dataclasses.dataclass(frozen=True, repr=False)
class SiLU(Activation):
    """Swish/SiLU: ``y = x σ(x)``;  ``d_x = σ(x) (1 + x (1 - σ(x))) d_y``."""
    independent_examples = True  # each example's output and input cotangent are its own
    self_adjoint = True  # elementwise: a diagonal Jacobian, so the tangent is the backward (fbp.linear_pass)

    def _forward(self, x):
        s = jax.nn.sigmoid(x)
        return x * s, (x, s)

    def _backward(self, res, d_y):
        x, s = res
        return s * (1 + x * (1 - s)) * d_y

    def second_derivative(self, res):
        """``f'' = σ(1-σ)(2 + x(1-2σ))``."""
        x, s = res
        return s * (1 - s) * (2 + x * (1 - 2 * s))


def _wide(x):
    """16-bit floats widened to float32 (softmax in a mixed-precision model, ``fbp.precision``)."""
    return x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x


@dataclasses.dataclass(frozen=True, repr=False)
class Softmax(Activation):
    """``y_i = e^{x_i} / Σ_j e^{x_j}`` along ``axis`` (shifted by the max, stable).

    Jacobian ``∂y_i/∂x_j = y_i (δ_ij - y_j)``, so ``d_x = y ⊙ (d_y - Σ_j d_y_j y_j)``.
    For classification prefer logits with ``CategoricalCrossEntropy(from_logits=True)``.

    Args:
        axis: the axis normalised over (default the last).
    """

    def examples_independent(self, train: bool) -> bool | None:
        """Along a feature axis each example is its own; along axis 0 (the batch) examples mix;
        another negative axis depends on the input's rank, so it is measured."""
        return False if self.axis == 0 else (True if self.axis > 0 or self.axis == -1 else None)

    axis: int = -1

    def _forward(self, x):
        w = _wide(x)  # 16-bit input: computed in float32 (mixed precision), returned in its dtype
        e = jnp.exp(w - lax.stop_gradient(w.max(axis=self.axis, keepdims=True)))
        y = e / e.sum(axis=self.axis, keepdims=True)
        return y.astype(x.dtype), y

    def _backward(self, y, d_y):
        return (y * (_wide(d_y) - (_wide(d_y) * y).sum(axis=self.axis, keepdims=True))).astype(d_y.dtype)

    self_adjoint = True  # J = diag(s) - s sᵀ is symmetric: the tangent is the backward (fbp.linear_pass)

    def _backward_tangent(self, y, t, d_y):
        """Second order (``fbp.second_order``): with ``ds = s ⊙ (t - ⟨s, t⟩)``, the backward's
        derivative is ``ds ⊙ (d_y - ⟨s, d_y⟩) - s ⟨ds, d_y⟩``."""
        t, d_y, ax = _wide(t), _wide(d_y), self.axis
        ds = y * (t - (y * t).sum(axis=ax, keepdims=True))
        return ds * (d_y - (y * d_y).sum(axis=ax, keepdims=True)) - y * (ds * d_y).sum(axis=ax, keepdims=True)


@dataclasses.dataclass(frozen=True, repr=False)
class LogSoftmax(Activation):
    """``y_i = x_i - log Σ_j e^{x_j}`` along ``axis`` (log-sum-exp, stable).

    ``∂y_i/∂x_j = δ_ij - softmax_j``, so ``d_x = d_y - e^{y} Σ_i d_y_i``.

    Args:
        axis: the axis normalised over (default the last).
    """

    def examples_independent(self, train: bool) -> bool | None:
        """Along a feature axis each example is its own; along axis 0 (the batch) examples mix;
        another negative axis depends on the input's rank, so it is measured."""
        return False if self.axis == 0 else (True if self.axis > 0 or self.axis == -1 else None)

    axis: int = -1

    def _forward(self, x):
        w = _wide(x)
        shifted = w - lax.stop_gradient(w.max(axis=self.axis, keepdims=True))
        y = shifted - jnp.log(jnp.exp(shifted).sum(axis=self.axis, keepdims=True))
        return y.astype(x.dtype), y

    def _backward(self, y, d_y):
        return (_wide(d_y) - jnp.exp(y) * _wide(d_y).sum(axis=self.axis, keepdims=True)).astype(d_y.dtype)

    def _tangent(self, y, d_x):
        """Forward mode (``fbp.linear_pass``): ``J = I - 1 sᵀ``, so ``d_y = d_x - Σ s ⊙ d_x``."""
        return (_wide(d_x) - (jnp.exp(y) * _wide(d_x)).sum(axis=self.axis, keepdims=True)).astype(d_x.dtype)

    def _backward_tangent(self, y, t, d_y):
        """Second order (``fbp.second_order``): ``d_x = d_y - s Σ d_y`` moves with ``s`` only:
        ``-s ⊙ (t - ⟨s, t⟩) Σ d_y``."""
        s, t = jnp.exp(y), _wide(t)
        return -s * (t - (s * t).sum(axis=self.axis, keepdims=True)) * _wide(d_y).sum(axis=self.axis, keepdims=True)
