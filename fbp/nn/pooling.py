"""Pooling and shape layers: MaxPool2D, AvgPool2D, GlobalAvgPool, Flatten, Reshape.

Pooling windows slide over the two spatial axes of ``(N, H, W, C)``. Each window's elements
are gathered along a new axis — by one reshape when the windows tile the input
(``strides == window``), else by one strided slice per window offset — and reduced there.

**Max-pool ties** follow JAX's ``grad`` of that same forward (``max`` over an axis): the
gradient of a window is **split equally among its tied maxima** (``d_x = [x = y] d_y / count``).
Overlapping windows add their shares. **Average pooling** with ``"SAME"`` padding averages
over the valid (unpadded) cells only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import InputError, ParameterFree, describe
from fbp.nn.windows import as_tuple, check_padding, window_padding
from fbp.validation import check_fields


def _geometry(owner, x, window, strides, padding):
    """Output size and per-axis ``(lo, hi)`` padding that makes the padded input exactly
    ``s (o - 1) + k`` long (``hi`` may be negative: VALID drops a remainder)."""
    if x.ndim != 4:
        raise InputError(repr(owner), f"input x must have rank 4 (NHWC), received {describe(x)}")
    base = window_padding(repr(owner), x, window, strides, padding)
    out, pads = [], []
    for n, k, s, (lo, hi) in zip(x.shape[1:3], window, strides, base, strict=True):
        o = (n + lo + hi - k) // s + 1
        out.append(o)
        pads.append((lo, s * (o - 1) + k - n - lo))
    return tuple(out), pads


class MaxPoolRes(NamedTuple):
    """What max pooling's backward keeps: where each window's maxima are, and the padding."""

    mask: jax.Array  # (N, oh, kh, ow, kw, C) when the windows tile the input, else (kh·kw, N, oh, ow, C)
    pads: list
    padded_shape: tuple


class AvgPoolRes(NamedTuple):
    """What average pooling's backward keeps: each window's count of valid cells, and the padding."""

    count: jax.Array
    pads: list
    padded_shape: tuple
    tiled: bool


def _pad(x, pads, value):
    return lax.pad(x, jnp.asarray(value, x.dtype), [(0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)])


def _unpad(d, pads):
    return lax.pad(d, jnp.zeros((), d.dtype), [(0, 0, 0), (-pads[0][0], -pads[0][1], 0),
                                               (-pads[1][0], -pads[1][1], 0), (0, 0, 0)])


def _gather(xp, window, strides, out):
    """Window elements along axis 0: shape ``(kh·kw, N, oh, ow, C)``."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out
    return jnp.stack([xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
                      for i in range(kh) for j in range(kw)])


def _scatter(parts, padded_shape, window, strides, out):
    """The transpose of ``_gather``: add each offset's part back where it came from."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out
    d = jnp.zeros(padded_shape, parts.dtype)
    for idx, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
        d = d.at[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :].add(parts[idx])
    return d


def _tiles(xp, window, out):
    """Windows as axes 2 and 4 when they tile the input: ``(N, oh, kh, ow, kw, C)``."""
    return xp.reshape(xp.shape[0], out[0], window[0], out[1], window[1], xp.shape[-1])


@dataclasses.dataclass(frozen=True)
class _Pool(ParameterFree):
    piecewise_linear = True  # max and mean pooling: piecewise linear in the input

    window: int | tuple[int, int]
    strides: int | tuple[int, int] | None = None
    padding: str | tuple = "VALID"

    def __post_init__(self):
        check_fields(self)
        as_tuple(self.window, 2, f"{type(self).__name__}: window")
        if self.strides is not None:
            as_tuple(self.strides, 2, f"{type(self).__name__}: strides")
        check_padding(type(self).__name__, self.padding, 2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window!r}, strides={self.strides!r}, padding={self.padding!r})"

    @property
    def _window(self):
        return as_tuple(self.window, 2, "window")

    @property
    def _strides(self):
        return self._window if self.strides is None else as_tuple(self.strides, 2, "strides")

    def _prepare(self, x):
        out, pads = _geometry(self, x, self._window, self._strides, self.padding)
        return out, pads, self._strides == self._window


@dataclasses.dataclass(frozen=True, repr=False)
class MaxPool2D(_Pool):
    """``y = max`` over each window (padding counts as -inf).
    ``d_x = Σ_windows [x = y] d_y / (number of tied maxima)``.

    Args:
        window: the window size, an int or ``(kh, kw)``.
        strides: the step between windows (default: the window, so windows tile the input).
        padding: ``"VALID"`` (default), ``"SAME"`` or explicit ``((lo, hi), (lo, hi))``.

    Shapes:
        ``x (N, H, W, C) -> y (N, oh, ow, C)``, ``oh = (H + lo + hi - kh) // sh + 1``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    def _forward(self, x):
        out, pads, tiled = self._prepare(x)
        xp = _pad(x, pads, -jnp.inf)
        if tiled:
            t = _tiles(xp, self._window, out)
            y = t.max(axis=(2, 4))
            mask = t == y[:, :, None, :, None, :]
        else:
            g = _gather(xp, self._window, self._strides, out)
            y = g.max(axis=0)
            mask = g == y
        return y, MaxPoolRes(mask, pads, xp.shape)

    def _backward(self, res: MaxPoolRes, d_y):
        mask, pads, padded_shape = res
        if mask.ndim == 6:
            share = mask * (d_y / mask.sum(axis=(2, 4)))[:, :, None, :, None, :]
            d_xp = share.reshape(padded_shape)
        else:
            share = mask * (d_y / mask.sum(axis=0))
            d_xp = _scatter(share, padded_shape, self._window, self._strides, d_y.shape[1:3])
        return _unpad(d_xp, pads)

    def _tangent(self, res: MaxPoolRes, d_x):
        """Forward mode (``fbp.linear_pass``): each window's tied maxima share ``d_x`` equally."""
        mask, pads, _ = res
        d_xp = _pad(d_x, pads, 0.0)
        if mask.ndim == 6:
            return (mask * _tiles(d_xp, self._window, (mask.shape[1], mask.shape[3]))).sum(axis=(2, 4)) / mask.sum(
                axis=(2, 4))
        return (mask * _gather(d_xp, self._window, self._strides, mask.shape[2:4])).sum(axis=0) / mask.sum(axis=0)


@dataclasses.dataclass(frozen=True, repr=False)
class AvgPool2D(_Pool):
    """``y = Σ_window x / count``, with ``count`` the window's valid (unpadded) cells;
    ``d_x = Σ_windows d_y / count``.

    Args:
        window: the window size, an int or ``(kh, kw)``.
        strides: the step between windows (default: the window, so windows tile the input).
        padding: ``"VALID"`` (default), ``"SAME"`` or explicit ``((lo, hi), (lo, hi))``.

    Shapes:
        ``x (N, H, W, C) -> y (N, oh, ow, C)``, ``oh = (H + lo + hi - kh) // sh + 1``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    def _forward(self, x):
        out, pads, tiled = self._prepare(x)
        xp = _pad(x, pads, 0.0)
        ones = _pad(jnp.ones((1, *x.shape[1:3], 1), x.dtype), pads, 0.0)
        if tiled:
            count = _tiles(ones, self._window, out).sum(axis=(2, 4))
            y = _tiles(xp, self._window, out).sum(axis=(2, 4)) / count
        else:
            count = _gather(ones, self._window, self._strides, out).sum(axis=0)
            y = _gather(xp, self._window, self._strides, out).sum(axis=0) / count
        return y, AvgPoolRes(count, pads, xp.shape, tiled)

    def _backward(self, res: AvgPoolRes, d_y):
        count, pads, padded_shape, tiled = res
        share = d_y / count
        if tiled:
            kh, kw = self._window
            d_xp = jnp.broadcast_to(share[:, :, None, :, None, :], (share.shape[0], share.shape[1], kh, share.shape[2],
                                                                      kw, share.shape[3])).reshape(padded_shape)
        else:
            parts = jnp.broadcast_to(share, (math.prod(self._window), *share.shape))
            d_xp = _scatter(parts, padded_shape, self._window, self._strides, d_y.shape[1:3])
        return _unpad(d_xp, pads)

    def _tangent(self, res: AvgPoolRes, d_x):
        """Forward mode (``fbp.linear_pass``): the forward itself (it is linear)."""
        count, pads, _, tiled = res
        d_xp, out = _pad(d_x, pads, 0.0), count.shape[1:3]
        if tiled:
            return _tiles(d_xp, self._window, out).sum(axis=(2, 4)) / count
        return _gather(d_xp, self._window, self._strides, out).sum(axis=0) / count


@dataclasses.dataclass(frozen=True)
class GlobalAvgPool(ParameterFree):
    """Mean over every axis between batch and channels: ``(N, ..., C) -> (N, C)``;
    ``d_x = d_y / (number of averaged positions)``, broadcast back."""
    independent_examples = True  # each example's output and input cotangent are its own

    piecewise_linear = True

    def _forward(self, x):
        if x.ndim < 3:
            raise InputError(repr(self), f"input x needs spatial axes (N, ..., C), received {describe(x)}")
        return x.mean(axis=tuple(range(1, x.ndim - 1))), x.shape

    def _backward(self, shape, d_y):
        count = math.prod(shape[1:-1])
        return jnp.broadcast_to((d_y / count).reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1]), shape)

    def _tangent(self, shape, d_x):
        """Forward mode (``fbp.linear_pass``): the forward itself (it is linear)."""
        return d_x.mean(axis=tuple(range(1, d_x.ndim - 1)))


@dataclasses.dataclass(frozen=True)
class Flatten(ParameterFree):
    """``(N, ...) -> (N, prod(...))``; the backward reshapes back (the residual is the shape)."""
    independent_examples = True  # each example's output and input cotangent are its own

    piecewise_linear = True

    floating_only = False

    def _forward(self, x):
        if x.ndim < 1:
            raise InputError(repr(self), f"input x needs a batch axis, received {describe(x)}")
        return x.reshape(x.shape[0], -1), x.shape

    def _backward(self, shape, d_y):
        return d_y.reshape(shape)

    def _tangent(self, shape, d_x):
        """Forward mode (``fbp.linear_pass``): the forward itself."""
        return d_x.reshape(d_x.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class Reshape(ParameterFree):
    """``(N, ...) -> (N, *shape)``; the backward reshapes back.

    Args:
        shape: the shape of each example after the reshape; one entry may be -1.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    piecewise_linear = True

    shape: tuple[int, ...]
    floating_only = False

    def _forward(self, x):
        target = (x.shape[0], *self.shape)
        known = math.prod(s for s in self.shape if s != -1)
        size = math.prod(x.shape[1:])
        if (-1 in self.shape and size % max(known, 1)) or (-1 not in self.shape and known != size):
            raise InputError(repr(self), f"cannot reshape input x {describe(x)} to (N, *{tuple(self.shape)})")
        return x.reshape(target), x.shape

    def _backward(self, shape, d_y):
        return d_y.reshape(shape)

    def _tangent(self, shape, d_x):
        """Forward mode (``fbp.linear_pass``): the forward itself."""
        return d_x.reshape(d_x.shape[0], *self.shape)
