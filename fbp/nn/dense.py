"""Dense (fully connected) layer.

Forward, for ``x`` of shape ``(..., n_in)``::

    y = x @ w + b                 w: (n_in, n_out), b: (n_out,)

Backward, with every leading axis of ``x`` flattened into one batch axis of size ``m``
(``X: (m, n_in)``, ``D = d_y: (m, n_out)``)::

    d_w = Xᵀ D                    one 2-D matmul over the whole batch (the fastest form)
    d_b = Σ_rows D
    d_x = D wᵀ                    reshaped back to x's shape

Residuals: ``(x, w)`` — the input and the kernel, nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, check_params, describe, require_floating
from fbp.nn import init as initializers
from fbp.nn.positions import Positions
from fbp.validation import check_fields


def accumulator(dtype):
    """The dtype sums over a batch run in.

    Args:
        dtype: the inputs' dtype.

    Returns:
        ``float32`` for 16-bit floats (mixed precision, ``fbp.precision``), else ``None`` (the
        inputs' own).
    """
    return jnp.float32 if dtype in (jnp.bfloat16, jnp.float16) else None


def weight_grad(a, b):
    """``a @ b``, a weight gradient (a sum over the batch), accumulated in at least float32.

    The product uses ``preferred_element_type`` and is rounded once to ``a``'s dtype.

    Args:
        a: ``(n_in, B)``: the layer's inputs, transposed.
        b: ``(B, n_out)``: the output cotangents.

    Returns:
        ``(n_in, n_out)`` in ``a``'s dtype.
    """
    return jnp.matmul(a, b, preferred_element_type=accumulator(a.dtype)).astype(a.dtype)


def bias_grad(d_y):
    """The gradient of a bias added along the last axis: ``Σ d_y`` over every other axis.

    Used by Dense, the convolutions, attention's and the recurrent layers' projections.

    Args:
        d_y: the output cotangent, ``(..., n_out)``.

    Returns:
        ``(n_out,)``.
    """
    return d_y.reshape(-1, d_y.shape[-1]).sum(axis=0)


def bilinear_backward_tangent(layer: Layer, res, d_params, d_x, d_y):
    """The second-order term (``fbp.second_order``) of a layer ``y = f(x, w) + b`` bilinear in
    ``(x, w)`` whose residuals are ``(x, w)`` (Dense, the convolutions): the derivative of its
    backward as ``(x, w)`` move along ``(d_x, d_w)``, ``d_y`` held — the weight gradient of the
    input's tangent and the input gradient through the weights' tangent (``d_b' = 0``).

    Args:
        layer: the layer.
        res: its residuals ``(x, w)``.
        d_params: the params' direction.
        d_x: the input's tangent, or ``None`` (zero).
        d_y: the output cotangent.

    Returns:
        ``(d_params', d_x')``: for Dense ``d_w' = d_xᵀ d_y`` and ``d_x' = d_y d_wᵀ``.
    """
    x, w = res
    second = {"w": jnp.zeros_like(w) if d_x is None else layer.backward((d_x, w), d_y)[0]["w"]}
    if layer.use_bias:
        second["b"] = jnp.zeros_like(d_params["b"])
    return second, layer.backward((x, d_params["w"]), d_y)[1]


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """``y = x @ w + b`` over the last axis of ``x``.

    Args:
        features: output width ``n_out``.
        use_bias: add the bias ``b``.
        kernel_init: initializer of ``w`` (default Glorot uniform, as in Keras).
        bias_init: initializer of ``b`` (default zeros).

    Params: ``{"w": (n_in, n_out), "b": (n_out,)}`` (no ``"b"`` when ``use_bias=False``).
    """
    independent_examples = True  # each example's output and input cotangent are its own

    piecewise_linear = True
    linear_in_params = True  # projections onto a direction: the forward with it as the params (core.Layer)

    features: int
    use_bias: bool = True
    kernel_init: Callable = initializers.glorot_uniform
    bias_init: Callable = initializers.zeros

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.features, int) or self.features < 1:
            raise ValueError(f"Dense: features must be a positive int, got {self.features!r}")

    def __repr__(self) -> str:
        return f"Dense(features={self.features}{'' if self.use_bias else ', use_bias=False'})"

    def init(self, key, x):
        self._check_input(x)
        k_w, k_b = jax.random.split(key)
        n_in, dtype = x.shape[-1], x.dtype
        params = {"w": self.kernel_init(k_w, (n_in, self.features), dtype)}
        if self.use_bias:
            params["b"] = self.bias_init(k_b, (self.features,), dtype)
        return params

    def forward(self, params, x):
        self._check_input(x)
        self._check_params(params, x)
        y = x @ params["w"]
        if self.use_bias:
            y = y + params["b"]
        return y, (x, params["w"])

    def backward(self, res, d_y):
        x, w = res
        x2 = x.reshape(-1, x.shape[-1])
        d_y2 = d_y.reshape(-1, d_y.shape[-1])
        d_params = {"w": weight_grad(x2.T, d_y2)}
        if self.use_bias:
            d_params["b"] = bias_grad(d_y2)
        d_x = (d_y2 @ w.T).reshape(x.shape)
        return d_params, d_x

    def per_example_positions(self, res, d_y):
        """Per-example rule (``fbp.nn.positions``): ``w`` is used at every position between the
        batch axis and the features (one position on ``(B, n_in)`` input)."""
        x = res[0]
        x3, g3 = x.reshape(x.shape[0], -1, x.shape[-1]), d_y.reshape(d_y.shape[0], -1, d_y.shape[-1])
        return [Positions(((("w",), [x3], (x.shape[-1], d_y.shape[-1])),), g3, ("b",) if self.use_bias else None)], {}

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): ``d_y = x d_w + d_b + d_x w``."""
        x, w = res
        d_y = x @ d_params["w"]
        if self.use_bias:
            d_y = d_y + d_params["b"]
        return d_y if d_x is None else d_y + d_x @ w

    def backward_tangent(self, res, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): ``d_w' = d_xᵀ d_y``, ``d_x' = d_y d_wᵀ``."""
        return bilinear_backward_tangent(self, res, d_params, d_x, d_y)

    def swap_kernel(self, res, kernel):
        """``(w, res')``: the kernel held in the residuals and the residuals with ``kernel`` in its
        place — so ``backward(res', d_y)`` sends ``d_x = d_y kernelᵀ`` (feedback alignment, ``fbp.credit``)."""
        x, w = res
        return w, (x, kernel)

    # ------------------------------------------------------------------ validation
    def _check_input(self, x):
        require_floating(repr(self), x)
        if x.ndim < 1:
            raise InputError(repr(self), f"input x must have at least one axis (..., n_in), received {describe(x)}")

    def _check_params(self, params, x):
        expected = {"w": (x.shape[-1], self.features)}
        if self.use_bias:
            expected["b"] = (self.features,)

        def hint(name, value):
            if name == "w" and value.ndim == 2 and value.shape[1] == self.features:
                return (f" — the input x {describe(x)} has width {x.shape[-1]} but the kernel expects "
                        f"{value.shape[0]}; check the input width or re-init the params")
            return ""

        check_params(repr(self), params, expected, x, hint)
