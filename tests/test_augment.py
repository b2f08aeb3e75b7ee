"""Augmentations: shapes kept, randomness from the key only, and what each does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import augment


def _images():
    return jnp.arange(2 * 4 * 5 * 1, dtype=jnp.float32).reshape(2, 4, 5, 1)


def test_random_crop_shifts_within_padding():
    x = _images()
    y = augment.random_crop(1)(jax.random.PRNGKey(0), x)
    assert y.shape == x.shape
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    for n in range(2):  # each output is some window of the padded image
        assert any(np.array_equal(y[n], padded[n, i:i + 4, j:j + 5]) for i in range(3) for j in range(3))
    np.testing.assert_array_equal(augment.random_crop(0)(jax.random.PRNGKey(0), x), x)


def test_horizontal_flip_and_noise():
    x = _images()
    np.testing.assert_array_equal(augment.horizontal_flip(1.0)(jax.random.PRNGKey(0), x), x[:, :, ::-1])
    np.testing.assert_array_equal(augment.horizontal_flip(0.0)(jax.random.PRNGKey(0), x), x)
    noisy = augment.gaussian_noise(0.1)(jax.random.PRNGKey(0), jnp.zeros((1000, 10)))
    assert abs(float(noisy.std()) - 0.1) < 0.005


def test_deterministic_given_key_and_composable():
    f = augment.compose(augment.random_crop(2), augment.horizontal_flip(), augment.gaussian_noise(0.01))
    x = _images()
    np.testing.assert_array_equal(f(jax.random.PRNGKey(3), x), f(jax.random.PRNGKey(3), x))
    assert not np.array_equal(f(jax.random.PRNGKey(3), x), f(jax.random.PRNGKey(4), x))


def test_errors():
    with pytest.raises(fbp.InputError, match=r"\(N, H, W, C\)"):
        augment.random_crop(1)(jax.random.PRNGKey(0), jnp.ones((4, 4)))
    with pytest.raises(ValueError):
        augment.horizontal_flip(2.0)
