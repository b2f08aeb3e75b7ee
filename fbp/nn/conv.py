"""Convolutions on channels-last inputs (NWC, NHWC): Conv1D, Conv2D, ConvTranspose2D.

Every convolution here is one general dilated convolution ``y = conv(x, w)`` with window
strides ``s``, explicit padding ``(lo, hi)``, input (lhs) dilation ``a`` and kernel (rhs)
dilation ``d``, and ``G`` feature groups; a transposed convolution is the case ``s = 1``,
``a = strides``. Its two vector-Jacobian products are convolutions too (the rules JAX's own
``conv_general_dilated`` transpose uses, written out here):

* ``d_x`` — convolve ``d_y`` with the spatially **flipped** kernel whose input and output
  channels are swapped within each group, strides and input dilation exchanged
  (``window_strides = a``, ``lhs_dilation = s``), padding ``lo' = k_d - 1 - lo`` and
  ``hi' = a(n-1)+1 + k_d - 1 - (s(o-1)+1) - lo'`` (``k_d = d(k-1)+1``).
* ``d_w`` — ungrouped: matmuls of the input's shifted windows with ``d_y``
  (``conv_kernel_grad_matmul``, faster here); otherwise (groups, transposed) correlate the
  input with ``d_y``: the batch axis becomes the contracted feature axis (dimension numbers
  ``CHWN``, ``IHWO`` → ``HWNC``), ``window_strides = d``, ``rhs_dilation = s``, padding
  ``(lo, s(o-1)+1 - a(n-1)-1 + k_d - 1 - lo)``; groups become batch groups.

Residuals: ``(x, w)``. Kernel layout ``(*kernel_size, in_channels / G, features)``. Per
example, an ungrouped convolution is a Dense over its output pixels (``per_example_positions``)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import InputError, Layer, check_params, describe, require_floating
from fbp.nn import init as initializers
from fbp.nn.dense import accumulator, bias_grad, weight_grad
from fbp.nn.positions import Positions
from fbp.nn.windows import as_tuple, check_padding, window_padding
from fbp.validation import check_fields

Padding = str | Sequence[tuple[int, int]]
_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _dilate(size: int, factor: int) -> int:
    return 0 if size == 0 else 1 + factor * (size - 1)


def specs(n: int) -> tuple[str, str, str]:
    """Dimension numbers of an ``n``-D channels-last convolution.

    Args:
        n: the number of spatial dimensions (1, 2 or 3).

    Returns:
        ``("NHWC", "HWIO", "NHWC")`` for ``n = 2``, and likewise for 1 and 3.
    """
    s = _SPATIAL[n]
    return f"N{s}C", f"{s}IO", f"N{s}C"


def conv(x, w, strides, pads, lhs_dilation, rhs_dilation, groups):
    """The forward: one general dilated convolution, channels last.

    Args:
        x: the input, ``(N, *spatial, C_in)``.
        w: the kernel, ``(*taps, C_in / groups, C_out)``.
        strides: the stride per spatial dimension.
        pads: ``(low, high)`` padding per spatial dimension.
        lhs_dilation: the input dilation per spatial dimension (``ConvTranspose``'s stride).
        rhs_dilation: the kernel dilation per spatial dimension.
        groups: the feature group count (``C_in`` for a depthwise convolution).

    Returns:
        ``(N, *out_spatial, C_out)``.
    """
    lhs, rhs, out = specs(x.ndim - 2)
    return lax.conv_general_dilated(x, w, strides, pads, lhs_dilation, rhs_dilation, (lhs, rhs, out),
                                    feature_group_count=groups)


def conv_input_grad(d_y, w, x_shape, strides, pads, lhs_dilation, rhs_dilation, groups):
    """``d_x`` of ``conv``: a convolution of ``d_y`` with the flipped, channel-swapped kernel.

    Args:
        d_y: the output cotangent, ``(N, *out_spatial, C_out)``.
        w: the kernel, ``(*taps, C_in / groups, C_out)``.
        x_shape: the input's shape, ``(N, *spatial, C_in)``.
        strides: the stride per spatial dimension.
        pads: ``(low, high)`` padding per spatial dimension.
        lhs_dilation: the input dilation per spatial dimension (``ConvTranspose``'s stride).
        rhs_dilation: the kernel dilation per spatial dimension.
        groups: the feature group count (``C_in`` for a depthwise convolution).

    Returns:
        ``d_x`` with shape ``x_shape``.
    """
    n = len(strides)
    k = w.shape[:n]
    in_sizes, out_sizes = x_shape[1:-1], d_y.shape[1:-1]
    new_pads = []
    for i in range(n):
        k_d = _dilate(k[i], rhs_dilation[i])
        lo = k_d - 1 - pads[i][0]
        hi = _dilate(in_sizes[i], lhs_dilation[i]) + k_d - 1 - _dilate(out_sizes[i], strides[i]) - lo
        new_pads.append((lo, hi))
    c_in_g, c_out = w.shape[-2], w.shape[-1]
    # (..., I, G, O/G) -> (..., G, I, O/G) -> (..., G*I, O/G): per group, swap input and output channels
    wt = w.reshape(*k, c_in_g, groups, c_out // groups)
    wt = jnp.moveaxis(wt, n + 1, n).reshape(*k, groups * c_in_g, c_out // groups)
    wt = jnp.flip(wt, axis=tuple(range(n)))
    s = _SPATIAL[n]
    return lax.conv_general_dilated(d_y, wt, lhs_dilation, new_pads, strides, rhs_dilation,
                                    (f"N{s}C", f"{s}OI", f"N{s}C"), feature_group_count=groups)


def conv_kernel_grad(x, d_y, kernel_shape, strides, pads, lhs_dilation, rhs_dilation, groups):
    """``d_w`` of ``conv``: the input correlated with ``d_y`` over batch and space.

    Accumulates in float32 for half-precision inputs (``accumulator``).

    Args:
        x: the input, ``(N, *spatial, C_in)``.
        d_y: the output cotangent, ``(N, *out_spatial, C_out)``.
        kernel_shape: ``(*taps, C_in / groups, C_out)``.
        strides: the stride per spatial dimension.
        pads: ``(low, high)`` padding per spatial dimension.
        lhs_dilation: the input dilation per spatial dimension (``ConvTranspose``'s stride).
        rhs_dilation: the kernel dilation per spatial dimension.
        groups: the feature group count (``C_in`` for a depthwise convolution).

    Returns:
        ``d_w`` with shape ``kernel_shape``, in ``x``'s dtype.
    """
    n = len(strides)
    in_sizes, out_sizes = x.shape[1:-1], d_y.shape[1:-1]
    new_pads = []
    for i in range(n):
        k_d = _dilate(kernel_shape[i], rhs_dilation[i])
        hi = _dilate(out_sizes[i], strides[i]) - _dilate(in_sizes[i], lhs_dilation[i]) + k_d - 1 - pads[i][0]
        new_pads.append((pads[i][0], hi))
    s = _SPATIAL[n]
    return lax.conv_general_dilated(x, d_y, rhs_dilation, new_pads, lhs_dilation, strides,
                                    (f"C{s}N", f"I{s}O", f"{s}NC"), batch_group_count=groups,
                                    preferred_element_type=accumulator(x.dtype)).astype(x.dtype)


IM2COL_MAX_WIDTH = 64  # patch width (kernel taps × input channels) up to which one im2col matmul wins


def conv_kernel_grad_matmul(x, d_y, kernel_shape, strides, pads, rhs_dilation):
    """``d_w`` of an ungrouped convolution without input dilation, as matmuls over the batch.

    For kernel offset ``t``, ``X_t`` is the (strided, dilated) window of the padded input that
    meets ``w[t]``, flattened to ``(M, C_in)`` with ``M = N·prod(out)``; then
    ``d_w[t] = X_tᵀ D`` with ``D = d_y`` as ``(M, C_out)``. Narrow patches (``taps·C_in <= 64``)
    are concatenated into one im2col matrix and multiplied once; wide ones take one matmul per
    offset, which never holds all patches at once. On this project's CPU both beat XLA's
    kernel-gradient convolution (see ``benchmarks/bench_cnn.py``).

    Args:
        x: the input, ``(N, *spatial, C_in)``.
        d_y: the output cotangent, ``(N, *out_spatial, C_out)``.
        kernel_shape: ``(*taps, C_in, C_out)``.
        strides: the stride per spatial dimension.
        pads: ``(low, high)`` padding per spatial dimension.
        rhs_dilation: the kernel dilation per spatial dimension.

    Returns:
        ``d_w`` with shape ``kernel_shape``.
    """
    n = len(strides)
    taps, c_in, c_out = kernel_shape[:n], kernel_shape[-2], kernel_shape[-1]
    out = d_y.shape[1:-1]
    d2 = d_y.reshape(-1, c_out)
    if math.prod(taps) * c_in <= IM2COL_MAX_WIDTH:
        windows = conv_windows(x, kernel_shape, strides, pads, rhs_dilation, out)
        patches = jnp.concatenate([w.reshape(-1, c_in) for w in windows], axis=-1)
        return weight_grad(patches.T, d2).reshape(kernel_shape)
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
    offsets = list(itertools.product(*(range(k) for k in taps)))
    # one offset at a time inside a loop, so only one window is ever materialised
    sizes = tuple(s * (m - 1) + 1 for s, m in zip(strides, out, strict=True))

    def one(offset):
        lo = (o * d for o, d in zip(offset, rhs_dilation, strict=True))
        start = tuple(jnp.asarray(v, jnp.int32) for v in (0, *lo, 0))
        block = lax.dynamic_slice(xp, start, (xp.shape[0], *sizes, c_in))
        block = block[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
        return weight_grad(block.reshape(-1, c_in).T, d2)

    return lax.map(one, jnp.array(offsets, jnp.int32)).reshape(kernel_shape)


def conv_windows(x, kernel_shape, strides, pads, rhs_dilation, out_spatial) -> list:
    """The im2col patches of an ungrouped convolution without input dilation, one kernel tap at a time.

    The windows come in the order of ``w.reshape(-1, C_out)``'s rows, so the kernel gradient of
    example ``b`` is ``concat_k(windows[k][b]ᵀ d_y[b])``. They are kept apart (never concatenated
    into one ``taps·C_in``-wide patch matrix) so per-example gradients and Gram matrices
    (``fbp.per_example``) need one window at a time.

    Args:
        x: the input, ``(N, *spatial, C_in)``.
        kernel_shape: ``(*taps, C_in, C_out)``.
        strides: the stride per spatial dimension.
        pads: ``(low, high)`` padding per spatial dimension.
        rhs_dilation: the kernel dilation per spatial dimension.
        out_spatial: the output's spatial sizes.

    Returns:
        A list, one ``(N, prod(out_spatial), C_in)`` window per kernel tap.
    """
    n = len(strides)
    taps, c_in = kernel_shape[:n], kernel_shape[-2]
    xp = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
    windows = []
    for offset in itertools.product(*(range(k) for k in taps)):
        index = tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                      for o, d, s, m in zip(offset, rhs_dilation, strides, out_spatial, strict=True))
        windows.append(xp[(slice(None), *index, slice(None))].reshape(x.shape[0], -1, c_in))
    return windows


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
        expected = "N" + _SPATIAL[self.rank] + "C"
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
        if g == 1 and all(a == 1 for a in lhs_dil):
            d_w = conv_kernel_grad_matmul(x, d_y, w.shape, strides, pads, rhs_dil)
        else:
            d_w = conv_kernel_grad(x, d_y, w.shape, strides, pads, lhs_dil, rhs_dil, g)
        d_params = {"w": d_w}
        if self.use_bias:
            d_params["b"] = bias_grad(d_y)
        return d_params, conv_input_grad(d_y, w, x.shape, strides, pads, lhs_dil, rhs_dil, g)

    def swap_kernel(self, res, kernel):
        """``(w, res')``: the kernel held in the residuals and the residuals with ``kernel`` in its
        place, so ``backward(res', d_y)`` sends ``d_x`` through ``kernel`` (``fbp.credit``)."""
        x, w = res
        return w, (x, kernel)


class _Conv(_ConvBase):
    def _geometry(self, x):
        strides, dilation = as_tuple(self.strides, self.rank, "strides"), as_tuple(self.dilation, self.rank, "dilation")
        k_d = [_dilate(k, d) for k, d in zip(self._k, dilation, strict=True)]
        pads = window_padding(repr(self), x, k_d, strides, self.padding, what="the (dilated) window")
        return strides, pads, (1,) * self.rank, dilation

    def per_example_positions(self, res, d_y):
        """Per-example rule (``fbp.nn.positions``): a Dense over the output pixels, one part per
        kernel tap (``conv_windows``); ``None`` if grouped (its rules then run per example)."""
        x, w = res
        if self.feature_group_count != 1:
            return None
        strides, pads, _, rhs_dilation = self._geometry(x)
        parts, g3 = conv_windows(x, w.shape, strides, pads, rhs_dilation, d_y.shape[1:-1]), d_y.reshape(
            d_y.shape[0], -1, d_y.shape[-1])
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
        k_d = [_dilate(k, d) for k, d in zip(self._k, dilation, strict=True)]
        if isinstance(self.padding, str):
            pads = [_transpose_padding(k, s, self.padding) for k, s in zip(k_d, strides, strict=True)]
        else:
            pads = [tuple(p) for p in self.padding]
        return (1, 1), pads, strides, dilation
