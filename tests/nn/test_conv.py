"""Convolutions vs jax.grad over strides, padding, dilation, groups and odd sizes; errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn

CONFIGS = [dict(strides=s, padding=p, dilation=d, feature_group_count=g)
           for s, p, d, g in itertools.product([1, 2], ["SAME", "VALID", ((1, 2), (0, 1))], [1, 2], [1, 2])]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_conv2d_geometries_match_jax(config):
    layer = nn.Conv2D(4, (3, 2), **config)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 4))  # odd sizes
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x, jit=True)


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2D(3, 3), (2, 5, 5, 2)), (nn.Conv1D(4, 3, strides=2, dilation=2), (3, 11, 2)),
    (nn.Conv1D(6, 5, padding="VALID", feature_group_count=3), (2, 9, 3)),
    (nn.ConvTranspose2D(3, 3, strides=2), (2, 4, 5, 2)), (nn.ConvTranspose2D(2, (2, 3), strides=(3, 1),
                                                                          padding="VALID"), (1, 3, 4, 3)),
    (nn.Conv2D(4, 3, use_bias=False, feature_group_count=4), (2, 6, 6, 4)),
    # wide patches (taps x channels > 64): the kernel gradient loops over offsets
    (nn.Conv2D(5, 3, strides=2, dilation=2), (2, 9, 8, 16)), (nn.Conv1D(3, 5, strides=3, padding="VALID"), (2, 17, 16)),
    (nn.Conv2D(4, (3, 2), padding=((2, 0), (1, 3)), strides=(1, 2)), (2, 7, 7, 40))])
def test_conv_layers_match_jax(layer, shape, dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), shape, dtype)
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x, dtype=dtype, jit=jit)


def test_forward_matches_lax_and_output_shapes():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    layer = nn.Conv2D(5, 3, strides=2)
    p = layer.init(jax.random.PRNGKey(1), x)
    ref = jax.lax.conv_general_dilated(x, p["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.apply(p, x), ref + p["b"], rtol=1e-5, atol=1e-6)
    t = nn.ConvTranspose2D(3, 3, strides=2)
    pt = t.init(jax.random.PRNGKey(2), x)
    assert t.apply(pt, x).shape == (2, 16, 16, 3)
    ref_t = jax.lax.conv_transpose(x, pt["w"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(t.apply(pt, x), ref_t + pt["b"], rtol=1e-5, atol=1e-6)


def test_errors_name_layer_and_shapes():
    layer = nn.Conv2D(4, 3)
    with pytest.raises(fbp.InputError, match=r"rank 4 \(NHWC, channels last\), received \(8, 8, 3\) float32"):
        layer.init(jax.random.PRNGKey(0), jnp.ones((8, 8, 3)))
    p = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)))
    with pytest.raises(fbp.InputError, match=r"parameter 'w' expected shape \(3, 3, 5, 4\).*expects 3 input "
                                             r"channels, the input has 5"):
        layer.apply(p, jnp.ones((1, 8, 8, 5)))
    with pytest.raises(fbp.InputError, match=r"window \(5, 5\) is larger than the padded input \(3, 3\)"):
        nn.Conv2D(2, 5, padding="VALID").init(jax.random.PRNGKey(0), jnp.ones((1, 3, 3, 1)))
    with pytest.raises(fbp.InputError, match="divisible by feature_group_count"):
        nn.Conv2D(4, 3, feature_group_count=2).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="kernel_size must be"):
        nn.Conv2D(4, (3, 3, 3))


def test_both_kernel_gradients_equal_jax_s(monkeypatch):
    """The kernel gradient has two implementations, picked by what XLA runs convolutions on
    (``fbp.xla_cpu.native_convolutions``): a convolution, and shifted-window matmuls where the
    convolutions are YNNPACK's. Each equals ``jax.vjp`` of ``lax.conv_general_dilated`` in float64
    over strides, padding, dilation and 1-D/2-D/3-D, and a planted error (one kernel tap's
    window shifted) is caught."""
    from fbp import xla_cpu
    from fbp.nn import conv_ops

    with jax.enable_x64(True):
        key = iter(jax.random.split(jax.random.PRNGKey(3), 64))
        cases = [((2, 9, 4), (3, 4, 5), (2,), ((1, 2),), (1,)),
                 ((2, 7, 6, 3), (3, 2, 3, 4), (1, 2), ((1, 1), (0, 1)), (2, 1)),
                 ((2, 6, 6, 9), (3, 3, 9, 5), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # taps x channels > 64
                 ((1, 5, 4, 6, 2), (2, 2, 3, 2, 3), (1, 1, 2), ((0, 1), (1, 1), (1, 0)), (1, 2, 1))]
        for x_shape, k_shape, strides, pads, dil in cases:
            x = jax.random.normal(next(key), x_shape, jnp.float64)
            w = jax.random.normal(next(key), k_shape, jnp.float64)
            lhs, rhs, out = conv_ops.specs(len(strides))
            def forward(w, x=x, strides=strides, pads=pads, dil=dil, specs=(lhs, rhs, out)):
                return jax.lax.conv_general_dilated(x, w, strides, pads, None, dil, specs)
            y, vjp = jax.vjp(forward, w)
            d_y = jax.random.normal(next(key), y.shape, jnp.float64)
            (want,) = vjp(d_y)
            by_matmul = conv_ops.conv_kernel_grad_matmul(x, d_y, w.shape, strides, pads, dil)
            by_conv = conv_ops.conv_kernel_grad(x, d_y, w.shape, strides, pads, (1,) * len(strides), dil, 1)
            np.testing.assert_allclose(by_matmul, want, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(by_conv, want, rtol=1e-10, atol=1e-12)
            shifted = conv_ops.conv_kernel_grad_matmul(jnp.roll(x, 1, axis=1), d_y, w.shape, strides, pads, dil)
            assert not np.allclose(shifted, want, rtol=1e-6)
        # and the layer takes the matmul route where convolutions are YNNPACK's, with the same result
        layer = nn.Conv2D(5, 3)
        x = jax.random.normal(next(key), (2, 6, 6, 3), jnp.float64)
        params = layer.init(next(key), x)
        y, res = layer.forward(params, x)
        d_y = jax.random.normal(next(key), y.shape, jnp.float64)
        native = layer.backward(res, d_y)
        monkeypatch.setattr(xla_cpu, "native_convolutions", lambda: False)
        called = []
        real = conv_ops.conv_kernel_grad_matmul
        monkeypatch.setattr(fbp.nn.conv, "conv_kernel_grad_matmul", lambda *a: called.append(1) or real(*a))
        ynn = layer.backward(res, d_y)
        assert called
        np.testing.assert_allclose(ynn[0]["w"], native[0]["w"], rtol=1e-10)


def test_windows_made_one_at_a_time_are_the_kernel_taps():
    """``ConvWindows`` (the per-example rules' parts, ``fbp.nn.positions.LoopedParts``): each
    tap's window, static or at a traced index inside a loop, times ``d_y`` is that tap's slice of
    ``jax.vjp``'s kernel gradient (float64, strides, padding, dilation, 1-D/2-D/3-D); a planted
    error (the taps' order reversed in the loop) is caught."""
    from fbp.nn import conv_ops

    class Reversed(conv_ops.ConvWindows):
        def at(self, i):
            return super().at(self.count - 1 - i)

    with jax.enable_x64(True):
        key = iter(jax.random.split(jax.random.PRNGKey(5), 32))
        cases = [((2, 9, 4), (3, 4, 5), (2,), ((1, 2),), (1,)),
                 ((2, 7, 6, 3), (3, 2, 3, 4), (1, 2), ((1, 1), (0, 1)), (2, 1)),
                 ((1, 5, 4, 6, 2), (2, 2, 3, 2, 3), (1, 1, 2), ((0, 1), (1, 1), (1, 0)), (1, 2, 1))]
        for x_shape, k_shape, strides, pads, dil in cases:
            x = jax.random.normal(next(key), x_shape, jnp.float64)
            w = jax.random.normal(next(key), k_shape, jnp.float64)
            specs = conv_ops.specs(len(strides))
            y, vjp = jax.vjp(lambda w, x=x, s=strides, p=pads, d=dil, sp=specs:
                             jax.lax.conv_general_dilated(x, w, s, p, None, d, sp), w)
            d_y = jax.random.normal(next(key), y.shape, jnp.float64)
            want = vjp(d_y)[0].reshape(-1, k_shape[-2], k_shape[-1])  # (taps, C_in, C_out)
            d2 = d_y.reshape(-1, k_shape[-1])

            def looped(x, cls=conv_ops.ConvWindows, geometry=(k_shape, strides, pads, dil, y.shape[1:-1]), d2=d2):
                windows = cls(x, *geometry)
                return jax.lax.map(lambda i: windows.at(i).reshape(-1, windows.width).T @ d2,
                                   jnp.arange(windows.count))

            static = conv_ops.ConvWindows(x, k_shape, strides, pads, dil, y.shape[1:-1])
            assert len(static) == want.shape[0] and static.width == k_shape[-2]
            np.testing.assert_allclose(jnp.stack([p.reshape(-1, static.width).T @ d2 for p in static]), want,
                                       rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(jax.jit(looped)(x), want, rtol=1e-10, atol=1e-12)
            assert not np.allclose(jax.jit(lambda x: looped(x, Reversed))(x), want, rtol=1e-6)


def _conv_layouts(fn, *args) -> list[tuple[str, str, str]]:
    """``(lhs, kernel, out)`` dimension labels of every convolution XLA compiled for ``fn``."""
    import re

    text = jax.jit(fn).lower(*args).compile().as_text()
    return [tuple(re.split(r"_|->", labels)) for labels in re.findall(r"dim_labels=([^,\s]+)", text)]


def _batch_major(layouts) -> bool:
    """Every convolution in the layout XLA's CPU runs on Eigen: batch first and features last
    (``b01f``) for the input and the output, the kernel's input then output features last (``01io``)."""
    return all(lhs[0] == out[0] == "b" and lhs[-1] == out[-1] == "f" and kernel[-2:] == "io"
               for lhs, kernel, out in layouts)


def test_gradients_keep_the_fast_layout_inside_loops_and_branches():
    """XLA's CPU backend moves a convolution into its canonical (Eigen) layout at a program's top
    level but not inside a ``scan``'s or ``cond``'s body, where a kernel gradient named by
    dimension numbers (``f01b_i01o->01bf``) ran 35-150× slower and an input gradient with its
    kernel as ``01oi`` 3-4× slower — every CNN step of a scanned epoch or a Lanczos loop.
    ``conv_kernel_grad`` and ``conv_input_grad`` transpose their operands themselves. Checked on
    the compiled program of a scanned and a branched training step, for 1-D and 2-D, strided
    and dilated convolutions; both planted old formulations are caught."""
    if jax.default_backend() != "cpu":
        pytest.skip("the layout question is XLA CPU's")
    from fbp.nn import conv_ops

    for layer, shape in [(nn.Conv1D(4, 3, strides=2), (2, 9, 3)), (nn.Conv2D(4, 3), (2, 6, 6, 3)),
                         (nn.Conv2D(4, 3, dilation=2, padding="VALID"), (2, 7, 7, 3))]:
        xs = jax.random.normal(jax.random.PRNGKey(0), (3, *shape))
        params = layer.init(jax.random.PRNGKey(1), xs[0])

        def step(p, x, layer=layer):
            y, res = layer.forward(p, x)
            d_p, d_x = layer.backward(res, jnp.sin(y))
            return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, d_p), d_x.sum()

        scanned = _conv_layouts(lambda p, xs, step=step: jax.lax.scan(step, p, xs), params, xs)
        branched = _conv_layouts(lambda p, x, step=step: jax.lax.cond(x.sum() > 0, step, lambda p, x: (p, 0.0), p, x),
                                 params, xs[0])
        assert len(scanned) == len(branched) == 3, (layer, scanned, branched)  # forward, d_x, d_w
        assert _batch_major(scanned) and _batch_major(branched), (layer, scanned, branched)

    def old_kernel_grad(x, d_y):  # the kernel gradient as dimension numbers alone, before the fix
        return jax.lax.conv_general_dilated(x, d_y, (1, 1), ((1, 1), (1, 1)), None, None, ("CHWN", "IHWO", "HWNC"))

    xs, d_ys = jnp.ones((3, 2, 6, 6, 3)), jnp.ones((3, 2, 6, 6, 4))
    planted = _conv_layouts(lambda xs, d_ys: jax.lax.scan(lambda c, a: (c + old_kernel_grad(*a), None),
                                                            jnp.zeros((3, 3, 3, 4)), (xs, d_ys))[0], xs, d_ys)
    assert planted and not _batch_major(planted), planted

    w = jnp.ones((3, 3, 3, 4))

    def old_input_grad(d_y):  # the input gradient's kernel named "HWOI", before the fix
        return jax.lax.conv_general_dilated(d_y, jnp.flip(w, (0, 1)), (1, 1), ((1, 1), (1, 1)), None, None,
                                            ("NHWC", "HWOI", "NHWC"))

    planted = _conv_layouts(lambda d_ys: jax.lax.scan(lambda c, d: (c + old_input_grad(d).sum(), None), 0.0, d_ys)[0],
                            d_ys)
    assert planted and not _batch_major(planted), planted
    np.testing.assert_allclose(old_input_grad(d_ys[0]),
                               conv_ops.conv_input_grad(d_ys[0], w, xs[0].shape, (1, 1), ((1, 1), (1, 1)), (1, 1),
                                                        (1, 1), 1), rtol=1e-6)
    np.testing.assert_allclose(old_kernel_grad(xs[0], d_ys[0]),
                               conv_ops.conv_kernel_grad(xs[0], d_ys[0], (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)),
                                                         (1, 1), (1, 1), 1), rtol=1e-6)
