"""Data augmentation: pure, keyed functions of a batch ``(N, H, W, C)``.

Each is ``fn(key, x) -> x`` — pass one to ``fbp.train.fit(..., augment=fn)`` and every
training step augments its batch with a fresh key (never the validation data).
``compose(f, g)`` chains several with split keys.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.core import InputError, describe, require_number
from fbp.validation import typed_arguments

Augment = Callable[[jax.Array, jax.Array], jax.Array]


def _images(x, name):
    if x.ndim != 4:
        raise InputError(name, f"expects a batch of images (N, H, W, C), received {describe(x)}")


@typed_arguments
def random_crop(padding: int) -> Augment:
    """Zero-pad each image by ``padding`` on every side, then crop a random ``H×W`` window
    (per example): shifts of up to ``±padding`` pixels.

    Args:
        padding: pixels of zero padding on each side (the largest shift).

    Returns:
        An ``Augment``: ``f(key, x) -> x``, for ``fit(augment=...)``.
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"random_crop: padding must be an int >= 0 (pixels), got {padding!r}")

    def fn(key, x):
        _images(x, "random_crop")
        n, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
        crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jax.vmap(crop)(xp, offsets)

    return fn


@typed_arguments
def horizontal_flip(probability: float = 0.5) -> Augment:
    """Mirror each image left-right with ``probability`` (per example).

    Args:
        probability: the chance each image is mirrored.

    Returns:
        An ``Augment``.
    """
    require_number("horizontal_flip", "probability", probability, low=0.0, high=1.0)

    def fn(key, x):
        _images(x, "horizontal_flip")
        flip = jax.random.bernoulli(key, probability, (x.shape[0], 1, 1, 1))
        return jnp.where(flip, x[:, :, ::-1, :], x)

    return fn


@typed_arguments
def gaussian_noise(stddev: float) -> Augment:
    """Add ``N(0, stddev²)`` noise to every value (any shape).

    Args:
        stddev: the noise's standard deviation.

    Returns:
        An ``Augment``.
    """
    require_number("gaussian_noise", "stddev", stddev, low=0.0)

    def fn(key, x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise InputError("gaussian_noise", f"adds real-valued noise, so x must be floating; got {describe(x)}. "
                                               f"Convert it first (x.astype(jnp.float32)), or leave it out for ids")
        return x + stddev * jax.random.normal(key, x.shape, x.dtype)

    return fn


def compose(*augments: Augment) -> Augment:
    """Apply augmentations in order, each with its own key.

    Args:
        *augments: functions ``(key, x) -> x``.

    Returns:
        One augmentation ``(key, x) -> x`` that splits ``key`` among them.
    """

    def fn(key, x):
        for f, k in zip(augments, jax.random.split(key, max(len(augments), 1)), strict=False):
            x = f(k, x)
        return x

    return fn
