"""Window geometry shared by convolution and pooling: sizes as tuples, and the padding of a
sliding window over the spatial axes.

For an axis of ``n`` cells, a window of ``k`` cells (already dilated) and stride ``s``, the
padding ``(lo, hi)`` comes from ``"SAME"``/``"VALID"`` as in ``lax.padtype_to_pads`` or is given
explicitly; the window must fit the padded axis, ``n + lo + hi >= k``, and the output then has
``(n + lo + hi - k) // s + 1`` cells.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax import lax

from fbp.validation import InputError, describe


def as_tuple(value, n: int, name: str) -> tuple[int, ...]:
    """A window size, stride or dilation as a tuple of ``n`` positive ints.

    Args:
        value: an int or ``n`` ints, each ≥ 1.
        n: the number of spatial axes.
        name: the setting's name, for the message.

    Returns:
        A tuple of ``n`` ints.

    Raises:
        ValueError: a wrong count, a non-int or a value below 1.
    """
    out = (value,) * n if isinstance(value, int) else (tuple(value) if isinstance(value, (tuple, list)) else None)
    if out is None or len(out) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                               for v in out):
        raise ValueError(f"{name} must be a positive int or a tuple of {n} positive ints, got {value!r}")
    return out


def check_padding(owner: str, padding, n: int) -> None:
    """Check a padding setting: ``"SAME"``, ``"VALID"`` or ``n`` ``(lo, hi)`` pairs of ints ≥ 0.

    Args:
        owner: the layer's name, for the message.
        padding: the setting.
        n: the number of spatial axes.

    Raises:
        ValueError: anything else.
    """
    if isinstance(padding, str) and padding in ("SAME", "VALID"):
        return
    pairs = padding if isinstance(padding, (tuple, list)) else ()
    if len(pairs) != n or not all(isinstance(p, (tuple, list)) and len(p) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p) for p in pairs):
        raise ValueError(f"{owner}: padding must be 'SAME', 'VALID' or {n} (lo, hi) pairs of ints >= 0, got "
                         f"{padding!r}")


def window_padding(owner: str, x, window: Sequence[int], strides: Sequence[int], padding,
                   what: str = "window") -> list[tuple[int, int]]:
    """The ``(lo, hi)`` padding of each spatial axis of ``x``, checked.

    Args:
        owner: the layer's repr, for messages.
        x: the input, channels last (its spatial axes are ``x.shape[1:-1]``).
        window: the window (or dilated kernel) size per spatial axis.
        strides: the stride per spatial axis.
        padding: ``"SAME"``, ``"VALID"`` or explicit ``(lo, hi)`` pairs.
        what: how the message names the window (``"kernel"``, ``"window"``).

    Returns:
        One ``(lo, hi)`` pair per spatial axis.

    Raises:
        InputError: a wrong number of pairs, or a window larger than a padded axis; the message
            names ``owner`` and the input's shape.
    """
    spatial = tuple(x.shape[1:-1])
    if isinstance(padding, str):
        pads = [tuple(p) for p in lax.padtype_to_pads(spatial, window, strides, padding)]
    else:
        pads = [tuple(p) for p in padding]
        if len(pads) != len(spatial):
            raise InputError(owner, f"padding needs {len(spatial)} (lo, hi) pairs, got {padding!r}")
    if any(n + lo + hi < k for n, (lo, hi), k in zip(spatial, pads, window, strict=True)):
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads, strict=True))
        raise InputError(owner, f"{what} {tuple(window)} is larger than the padded input {padded}; "
                                f"input x {describe(x)}")
    return pads
