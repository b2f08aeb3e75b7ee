"""fbp.nn.positions: the column form of a convolution's squared per-example gradients and the
batch sum of squares, against the per-column sums they replace (float64 and float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp.nn import conv_ops
from fbp.nn.positions import ColumnSquares, Positions, batch_sum_squares


def _reference(parts, g, shape):
    """``Σ_c Σ_b (X_bᵀ G_b^c)²`` from materialised per-example gradients, one column at a time."""
    x = jnp.concatenate(list(parts), axis=-1)
    per = jnp.einsum("cbti,cbtj->cbij", jnp.broadcast_to(x, (g.shape[0], *x.shape)), g)
    return jnp.sum(jnp.square(per), axis=(0, 1)).reshape(shape)


@pytest.mark.parametrize("batch, columns, dtype, tol", [
    (12, 10, jnp.float64, 1e-12),  # im2col (10 >= IM2COL_COLUMNS columns), two chunks of 6 in the scan
    (7, 3, jnp.float64, 1e-12),  # one tap at a time (3 columns); the narrow parts: one chunk of 7
    (12, 10, jnp.float32, 2e-6), (7, 3, jnp.float32, 2e-6)])
def test_column_squares_of_taps_equal_the_per_column_sums(batch, columns, dtype, tol):
    with jax.enable_x64(dtype == jnp.float64):
        keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
        x = jax.random.normal(next(keys), (batch, 5, 6, 8), dtype)
        kernel = (3, 3, 8, 4)  # 72 wide: the taps a LoopedParts
        windows = conv_ops.ConvWindows(x, kernel, (1, 2), ((1, 1), (0, 1)), (1, 1), (5, 3))
        g = jax.random.normal(next(keys), (columns, batch, 15, 4), dtype)
        want = _reference(windows, g, kernel)

        def vmapped(g):  # as the engine's column vmap: the parts do not depend on the column
            return jax.vmap(lambda gc: Positions(((("w",), windows, kernel),), gc).column_squares())(g)

        got = jax.jit(lambda g: vmapped(g)[("w",)].total())(g)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(jnp.max(want)))
        narrow = [jax.random.normal(next(keys), (batch, 15, 2), dtype) for _ in range(3)]  # a first layer's taps
        found = jax.vmap(lambda gc: Positions(((("w",), narrow, (6, 4)),), gc).column_squares())(g)[("w",)]
        np.testing.assert_allclose(found.total(), _reference(narrow, g, (6, 4)), rtol=tol,
                                   atol=tol * float(jnp.max(want)))
        # a planted error, positions misaligned between the inputs and the cotangents, is caught
        wrong = ColumnSquares(found.parts, found.g2[:, :, ::-1], (6, 4), positions=True)
        assert not np.allclose(wrong.total(), _reference(narrow, g, (6, 4)), rtol=1e-3)


def test_batch_sum_squares_is_the_sum_and_half_precision_sums_in_float32():
    with jax.enable_x64(True):
        a = jax.random.normal(jax.random.PRNGKey(1), (37, 3, 5), jnp.float64)
        np.testing.assert_allclose(batch_sum_squares(a), jnp.sum(a * a, axis=0), rtol=1e-13)
        assert batch_sum_squares(a, jnp.float32).dtype == jnp.float32
    h = jnp.full((4096, 2), 1.0, jnp.bfloat16)  # 4096 ones: a bfloat16 running sum would stop at 256
    assert batch_sum_squares(h).dtype == jnp.bfloat16
    assert float(batch_sum_squares(h, jnp.float32)[0]) == 4096.0
