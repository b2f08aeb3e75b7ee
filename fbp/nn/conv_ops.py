"""The convolution kernels of ``fbp.nn.conv``: the forward and its two vector-Jacobian products.

Every convolution is one general dilated convolution ``y = conv(x, w)`` with window strides
``s``, explicit padding ``(lo, hi)``, input (lhs) dilation ``a`` and kernel (rhs) dilation
``d``, and ``G`` feature groups; a transposed convolution is the case ``s = 1``, ``a = strides``.
Its two vector-Jacobian products are convolutions too (the rules JAX's own
``conv_general_dilated`` transpose uses, written out here):

* ``d_x`` — convolve ``d_y`` with the spatially **flipped** kernel whose input and output
  channels are swapped within each group, strides and input dilation exchanged
  (``window_strides = a``, ``lhs_dilation = s``), padding ``lo' = k_d - 1 - lo`` and
  ``hi' = a(n-1)+1 + k_d - 1 - (s(o-1)+1) - lo'`` (``k_d = d(k-1)+1``).
* ``d_w`` — where XLA's CPU convolutions are YNNPACK's (``fbp.xla_cpu``), ungrouped ones as
  matmuls of the input's shifted windows with ``d_y`` (``conv_kernel_grad_matmul``, faster
  there); otherwise (XLA's own convolutions — fbp's default on the CPU — a GPU, groups,
  transposed) a convolution correlating the
  input with ``d_y``: the batch axis becomes the contracted feature axis (dimension numbers
  ``CHWN``, ``IHWO`` → ``HWNC``), ``window_strides = d``, ``rhs_dilation = s``, padding
  ``(lo, s(o-1)+1 - a(n-1)-1 + k_d - 1 - lo)``; groups become batch groups.

The forward is bilinear in ``(x, w)``, so its tangent (forward mode, ``fbp.linear_pass``) is
two forward convolutions: ``conv(x, d_w) + conv(d_x, w)``.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fbp.nn.dense import accumulator, weight_grad
from fbp.nn.positions import LoopedParts

SPATIAL_AXES = {1: "W", 2: "HW", 3: "DHW"}


def dilated_size(size: int, factor: int) -> int:
    """The extent of ``size`` taps spread ``factor`` apart: ``1 + factor (size - 1)`` (0 for none).

    Args:
        size: the number of taps (or cells).
        factor: the dilation.

    Returns:
        The dilated extent.
    """
    return 0 if size == 0 else 1 + factor * (size - 1)


def specs(n: int) -> tuple[str, str, str]:
    """Dimension numbers of an ``n``-D channels-last convolution.

    Args:
        n: the number of spatial dimensions (1, 2 or 3).

    Returns:
        ``("NHWC", "HWIO", "NHWC")`` for ``n = 2``, and likewise for 1 and 3.
    """
    s = SPATIAL_AXES[n]
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
        k_d = dilated_size(k[i], rhs_dilation[i])
        lo = k_d - 1 - pads[i][0]
        hi = dilated_size(in_sizes[i], lhs_dilation[i]) + k_d - 1 - dilated_size(out_sizes[i], strides[i]) - lo
        new_pads.append((lo, hi))
    c_in_g, c_out = w.shape[-2], w.shape[-1]
    # (..., I, G, O/G) -> (..., G, I, O/G) -> (..., G*I, O/G): per group, swap input and output channels
    wt = w.reshape(*k, c_in_g, groups, c_out // groups)
    wt = jnp.moveaxis(wt, n + 1, n).reshape(*k, groups * c_in_g, c_out // groups)
    # flipped, and (..., O/G, G*I) in memory: the kernel layout XLA's CPU runs on Eigen, which XLA
    # would not make inside a loop's or a branch's body (3-4× slower there; see conv_kernel_grad)
    wt = jnp.swapaxes(jnp.flip(wt, axis=tuple(range(n))), n, n + 1)
    return lax.conv_general_dilated(d_y, wt, lhs_dilation, new_pads, strides, rhs_dilation, specs(n),
                                    feature_group_count=groups)


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
        k_d = dilated_size(kernel_shape[i], rhs_dilation[i])
        hi = dilated_size(out_sizes[i], strides[i]) - dilated_size(in_sizes[i], lhs_dilation[i]) + k_d - 1 - pads[i][0]
        new_pads.append((pads[i][0], hi))
    # The channels become the batch and the batch the contracted features: (C_in, *spatial, N)
    # against (*out_spatial, N, C_out), transposed here rather than named by dimension numbers.
    # XLA's CPU backend moves such a convolution into its canonical layout (Eigen's) at the top
    # level but not inside a loop's or a branch's body, where the non-canonical one ran 35-150×
    # slower (3C3D's kernel gradients in a scanned step: 0.7-2 s instead of 6-17 ms).
    xt = jnp.transpose(x, (n + 1, *range(1, n + 1), 0))
    dt = jnp.transpose(d_y, (*range(1, n + 1), 0, n + 1))
    d_w = lax.conv_general_dilated(xt, dt, rhs_dilation, new_pads, lhs_dilation, strides, specs(n),
                                   batch_group_count=groups, preferred_element_type=accumulator(x.dtype))
    return jnp.transpose(d_w, (*range(1, n + 1), 0, n + 1)).astype(x.dtype)


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
    windows = ConvWindows(x, kernel_shape, strides, pads, rhs_dilation, out)  # one live at a time, in a loop
    return lax.map(lambda i: weight_grad(windows.at(i).reshape(-1, c_in).T, d2),
                   jnp.arange(len(windows), dtype=jnp.int32)).reshape(kernel_shape)


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
    return list(ConvWindows(x, kernel_shape, strides, pads, rhs_dilation, out_spatial))


@jax.tree_util.register_pytree_node_class
class ConvWindows(LoopedParts):
    """``conv_windows`` made one at a time: the padded input, and each tap's window sliced from it
    — statically when iterated, at a traced tap index by ``at(i)`` (``lax.dynamic_slice``, then
    the stride), so a loop over the taps holds one window (``fbp.nn.positions.LoopedParts``).

    Args:
        x: the input, ``(N, *spatial, C_in)`` (or, with ``padded=True``, already padded).
        kernel_shape: ``(*taps, C_in, C_out)``.
        strides: the stride per spatial dimension.
        pads: ``(low, high)`` padding per spatial dimension.
        rhs_dilation: the kernel dilation per spatial dimension.
        out_spatial: the output's spatial sizes.
        padded: ``x`` is already padded by ``pads`` (how ``tree_unflatten`` rebuilds it).
    """

    def __init__(self, x, kernel_shape, strides, pads, rhs_dilation, out_spatial, padded=False):
        n = len(strides)
        self.geometry = (tuple(kernel_shape), tuple(strides), tuple(map(tuple, pads)), tuple(rhs_dilation),
                         tuple(out_spatial))
        self.xp = x if padded else lax.pad(x, jnp.zeros((), x.dtype),
                                           [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0)])
        self.offsets = list(itertools.product(*(range(k) for k in kernel_shape[:n])))
        # (getattr: JAX may unflatten with placeholders in place of arrays)
        self.count, self.width, self.dtype = len(self.offsets), kernel_shape[-2], getattr(self.xp, "dtype", None)

    def tree_flatten(self):
        return (self.xp,), self.geometry

    @classmethod
    def tree_unflatten(cls, geometry, children):
        return cls(children[0], *geometry, padded=True)

    def _strided(self, block):
        strides = self.geometry[1]
        block = block[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]
        return block.reshape(block.shape[0], -1, self.width)

    def __iter__(self):
        _, strides, _, dilation, out = self.geometry
        for offset in self.offsets:
            index = tuple(slice(o * d, o * d + s * (m - 1) + 1)
                          for o, d, s, m in zip(offset, dilation, strides, out, strict=True))
            yield self._strided(self.xp[(slice(None), *index, slice(None))])

    def at(self, i):
        _, strides, _, dilation, out = self.geometry
        lo = jnp.asarray(self.offsets, jnp.int32)[i] * jnp.asarray(dilation, jnp.int32)
        sizes = tuple(s * (m - 1) + 1 for s, m in zip(strides, out, strict=True))
        zero = jnp.zeros((), jnp.int32)
        block = lax.dynamic_slice(self.xp, (zero, *(lo[k] for k in range(len(sizes))), zero),
                                  (self.xp.shape[0], *sizes, self.width))
        return self._strided(block)
