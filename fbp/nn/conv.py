"""Convolutions on channels-last inputs (NWC, NHWC): Conv1D, Conv2D, ConvTranspose2D.

Every convolution here is one general dilated convolution ``y = conv(x, w)``; a transposed
convolution is the case ``s = 1``, ``a = strides``. The kernels — the forward, its two
vector-Jacobian products (convolutions too) and the shifted windows — live in
``fbp.nn.conv_ops``, with the maths. Forward mode (``tangent``): the forward is bilinear in
``(x, w)``, so ``d_y = conv(x, d_w) + d_b + conv(d_x, w)``.

Residuals: ``(x, w)``. Kernel layout ``(*kernel_size, in_channels / G, features)``. Per
example, an ungrouped convolution is a Dense over its output pixels (``per_example_positions``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax

from fbp import xla_cpu
from fbp.core import InputError, Layer, check_params, describe, require_floating
from fbp.nn import init as initializers
from fbp.nn.conv_ops import (
    IM2COL_MAX_WIDTH,
    SPATIAL_AXES,
    ConvWindows,
    conv,
    conv_input_grad,
    conv_kernel_grad,
    conv_kernel_grad_matmul,
    dilated_size,
)
from fbp.nn.dense import bias_grad, bilinear_backward_tangent
from fbp.nn.positions import Positions
from fbp.nn.windows import as_tuple, check_padding, window_padding
from fbp.validation import check_fields

Padding = str | Sequence[tuple[int, int]]


# --------------------------------------------------------------------------- layers
@dataclasses.dataclass(frozen=True)
class _ConvBase(Layer):
    """Shared fields and checks; subclasses fix the rank and how strides/padding map onto
    the general convolution."""
    piecewise_linear = True
    linear_in_params = True  # projections onto a direction: the forward with it as the kernel (core.Layer)

    features: int
    kernel_size: int | tuple[int, ...]
    strides: int | tuple[int, ...] = 1
    padding: Padding = "SAME"
    dilation: int | tuple[int, ...] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    kernel_init: Callable = initializers.glorot_uniform
    bias_init: Callable = initializers.zeros
    rank: ClassVar[int] = 2

    def __post_init__(self):
        check_fields(self)
        name = type(self).__name__
        if not isinstance(self.features, int) or self.features < 1:
            raise ValueError(f"{name}: features must be a positive int, got {self.features!r}")
        as_tuple(self.kernel_size, self.rank, f"{name}: kernel_size")
        as_tuple(self.strides, self.rank, f"{name}: strides")
        as_tuple(self.dilation, self.rank, f"{name}: dilation")
        if isinstance(self.feature_group_count, bool) or not isinstance(self.feature_group_count, int) or \
                self.feature_group_count < 1:
            raise ValueError(f"{name}: feature_group_count must be a positive int, got {self.feature_group_count!r}")
        if self.features % self.feature_group_count:
            raise ValueError(f"{name}: features ({self.features}) must be divisible by feature_group_count "
                             f"({self.feature_group_count})")
        check_padding(name, self.padding, self.rank)

    def __repr__(self) -> str:
        extra = "".join(f", {f}={getattr(self, f)!r}" for f in ("strides", "padding", "dilation", "feature_group_count")
                        if getattr(self, f) != {"strides": 1, "padding": "SAME", "dilation": 1,
                                                "feature_group_count": 1}[f])
        return f"{type(self).__name__}(features={self.features}, kernel_size={self.kernel_size!r}{extra})"

    @property
    def _k(self):
        return as_tuple(self.kernel_size, self.rank, "kernel_size")

    def _check_input(self, x):
        require_floating(repr(self), x)
        expected = "N" + SPATIAL_AXES[self.rank] + "C"
        if x.ndim != self.rank + 2:
            raise InputError(repr(self), f"input x must have rank {self.rank + 2} ({expected}, channels last), "
                                         f"received {describe(x)}")
        if x.shape[-1] % self.feature_group_count:
            raise InputError(repr(self), f"input channels ({x.shape[-1]}) must be divisible by feature_group_count "
                                         f"({self.feature_group_count}); input x {describe(x)}")

    def _kernel_shape(self, x):
        return (*self._k, x.shape[-1] // self.feature_group_count, self.features)

    def init(self, key, x):
        self._check_input(x)
        self._geometry(x)  # raises if the window does not fit
        k_w, k_b = jax.random.split(key)
        params = {"w": self.kernel_init(k_w, self._kernel_shape(x), x.dtype)}
        if self.use_bias:
            params["b"] = self.bias_init(k_b, (self.features,), x.dtype)
        return params

    def _check_params(self, params, x):
        expected = {"w": self._kernel_shape(x)}
        if self.use_bias:
            expected["b"] = (self.features,)

        def hint(name, value):
            if name == "w" and value.ndim == len(expected["w"]):
                return (f" — the kernel expects {value.shape[-2] * self.feature_group_count} input "
                        f"channels, the input has {x.shape[-1]}")
            return ""

        check_params(repr(self), params, expected, x, hint)

    def _geometry(self, x):
        """(strides, pads, lhs_dilation, rhs_dilation) of the general convolution for input x."""
        raise NotImplementedError

    def forward(self, params, x):
        self._check_input(x)
        self._check_params(params, x)
        strides, pads, lhs_dil, rhs_dil = self._geometry(x)
        y = conv(x, params["w"], strides, pads, lhs_dil, rhs_dil, self.feature_group_count)
        if self.use_bias:
            y = y + params["b"]
        return y, (x, params["w"])

    def backward(self, res, d_y):
        x, w = res
        strides, pads, lhs_dil, rhs_dil = self._geometry(x)
        g = self.feature_group_count
        if g == 1 and all(a == 1 for a in lhs_dil) and not xla_cpu.native_convolutions():  # YNNPACK's: slower
            d_w = conv_kernel_grad_matmul(x, d_y, w.shape, strides, pads, rhs_dil)
        else:
            d_w = conv_kernel_grad(x, d_y, w.shape, strides, pads, lhs_dil, rhs_dil, g)
        d_params = {"w": d_w}
        if self.use_bias:
            d_params["b"] = bias_grad(d_y)
        return d_params, conv_input_grad(d_y, w, x.shape, strides, pads, lhs_dil, rhs_dil, g)

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): ``d_y = conv(x, d_w) + d_b + conv(d_x, w)``."""
        x, w = res
        geometry = (*self._geometry(x), self.feature_group_count)
        d_y = conv(x, d_params["w"], *geometry)
        if self.use_bias:
            d_y = d_y + d_params["b"]
        return d_y if d_x is None else d_y + conv(d_x, w, *geometry)

    def backward_tangent(self, res, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): the kernel gradient of ``d_x``, the input gradient through ``d_w``."""
        return bilinear_backward_tangent(self, res, d_params, d_x, d_y)

    def swap_kernel(self, res, kernel):
        """``(w, res')``: the kernel held in the residuals and the residuals with ``kernel`` in its
        place, so ``backward(res', d_y)`` sends ``d_x`` through ``kernel`` (``fbp.credit``)."""
        x, w = res
        return w, (x, kernel)


class _Conv(_ConvBase):
    def _geometry(self, x):
        strides, dilation = as_tuple(self.strides, self.rank, "strides"), as_tuple(self.dilation, self.rank, "dilation")
        k_d = [dilated_size(k, d) for k, d in zip(self._k, dilation, strict=True)]
        pads = window_padding(repr(self), x, k_d, strides, self.padding, what="the (dilated) window")
        return strides, pads, (1,) * self.rank, dilation

    def per_example_positions(self, res, d_y):
        """Per-example rule (``fbp.nn.positions``): a Dense over the output pixels, one part per
        kernel tap (``ConvWindows``, made one at a time where only products need them); ``None``
        if grouped (its rules then run per example)."""
        x, w = res
        if self.feature_group_count != 1:
            return None
        strides, pads, _, rhs_dilation = self._geometry(x)
        parts, g3 = ConvWindows(x, w.shape, strides, pads, rhs_dilation, d_y.shape[1:-1]), d_y.reshape(
            d_y.shape[0], -1, d_y.shape[-1])
        if parts.count * parts.width <= IM2COL_MAX_WIDTH:  # narrow windows (a first layer's): all at once,
            parts = list(parts)  # their loop cost the CNN's SumGradSquared 1.10-1.17x its time (bench_per_example)
        return [Positions(((("w",), parts, w.shape),), g3, ("b",) if self.use_bias else None)], {}


@dataclasses.dataclass(frozen=True, repr=False)
class Conv1D(_Conv):
    """1-D convolution over ``(N, W, C)``; ``y[n, w, o] = Σ_{k, c} x[n, s·w + d·k - lo, c] w[k, c, o] + b[o]``.

    Args:
        features: output channels.
        kernel_size: the window width, an int.
        strides: the step between windows.
        padding: ``"SAME"`` (default), ``"VALID"`` or explicit ``((lo, hi),)``.
        dilation: the spacing between kernel taps.
        feature_group_count: ``G`` groups (``G = C`` is a depthwise convolution).
        use_bias: add the bias ``b``.
        kernel_init: initializer of ``w`` (default Glorot uniform).
        bias_init: initializer of ``b`` (default zeros).

    Shapes:
        ``x (N, W, C) -> y (N, W', features)``; params ``{"w": (k, C / G, features), "b": (features,)}``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    rank: ClassVar[int] = 1


@dataclasses.dataclass(frozen=True, repr=False)
class Conv2D(_Conv):
    """2-D convolution over ``(N, H, W, C)`` (cross-correlation, as every deep-learning library).

    Args:
        features: output channels.
        kernel_size: an int or ``(kh, kw)``.
        strides: the step between windows, an int or a pair.
        padding: ``"SAME"`` (default), ``"VALID"`` or explicit ``((lo, hi), (lo, hi))``.
        dilation: the spacing between kernel taps, an int or a pair.
        feature_group_count: ``G`` groups (``G = C`` is a depthwise convolution).
        use_bias: add the bias ``b``.
        kernel_init: initializer of ``w`` (default Glorot uniform).
        bias_init: initializer of ``b`` (default zeros).
    Params: ``{"w": (kh, kw, C / G, features), "b": (features,)}``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    rank: ClassVar[int] = 2


def _transpose_padding(k: int, s: int, padding: str) -> tuple[int, int]:
    """Padding of the dilated-input convolution that makes a transposed convolution (as
    ``lax.conv_transpose``): SAME gives output size ``n·s``, VALID ``n·s + max(k - s, 0)``."""
    if padding == "SAME":
        total = k + s - 2
        lo = k - 1 if s > k - 1 else -(-total // 2)
    else:
        total = k + s - 2 + max(k - s, 0)
        lo = k - 1
    return lo, total - lo


@dataclasses.dataclass(frozen=True, repr=False)
class ConvTranspose2D(_ConvBase):
    """Transposed 2-D convolution (``lax.conv_transpose`` semantics, kernel not flipped): the
    input is dilated by ``strides`` and convolved with stride 1. ``"SAME"`` multiplies the
    spatial size by ``strides``. Params: ``{"w": (kh, kw, C, features), "b": (features,)}``.

    Args:
        features: output channels.
        kernel_size: an int or ``(kh, kw)``.
        strides: the input's dilation factor, an int or a pair.
        padding: ``"SAME"`` (default) or ``"VALID"``.
        dilation: the spacing between kernel taps.
        feature_group_count: must be 1 (grouped transposed convolutions are not supported).
        use_bias: add the bias ``b``.
        kernel_init: initializer of ``w`` (default Glorot uniform).
        bias_init: initializer of ``b`` (default zeros).

    Shapes:
        ``x (N, H, W, C) -> y (N, H', W', features)`` (``H' = sh H`` with ``"SAME"``).
    """
    independent_examples = True  # each example's output and input cotangent are its own

    rank: ClassVar[int] = 2

    def __post_init__(self):
        check_fields(self)
        super().__post_init__()
        if self.feature_group_count != 1:
            raise ValueError("ConvTranspose2D: feature_group_count must be 1")

    def _geometry(self, x):
        strides, dilation = as_tuple(self.strides, 2, "strides"), as_tuple(self.dilation, 2, "dilation")
        k_d = [dilated_size(k, d) for k, d in zip(self._k, dilation, strict=True)]
        if isinstance(self.padding, str):
            pads = [_transpose_padding(k, s, self.padding) for k, s in zip(k_d, strides, strict=True)]
        else:
            pads = [tuple(p) for p in self.padding]
        return (1, 1), pads, strides, dilation
