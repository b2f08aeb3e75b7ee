"""Bad input: the error fbp raises, and the checks that raise it.

Every check runs at trace time on shapes, dtypes and pytree structure (free under ``jit`` after
the first trace), or on values only where they are concrete (``is_concrete``). Messages
name the owner (a layer's or loss's repr, or a function), the path inside the model, the
parameter path, and the shapes/dtypes expected and received.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# --------------------------------------------------------------------------- errors
class InputError(ValueError):
    """Bad input to a layer or loss, found at trace time.

    The message names the layer (or loss), its path inside the model (``2`` is the third
    child of a ``Serial``; nested paths read ``1/0``), the parameter path if a parameter is
    at fault, and the shapes/dtypes expected and received.
    """

    def __init__(self, owner: str, detail: str, path: tuple[str, ...] = (), param: str | None = None):
        self.owner, self.detail, self.path, self.param = owner, detail, tuple(path), param
        super().__init__(self._message())

    def _message(self) -> str:
        where = "/".join(self.path) if self.path else "<root>"
        text = f"{self.owner} at path '{where}': "
        if self.param is not None:
            text += f"parameter '{'/'.join((*self.path, self.param))}' "
        return text + self.detail

    def within(self, *prefix: str) -> InputError:
        """The same error, seen from a parent that holds this layer at ``prefix``."""
        return InputError(self.owner, self.detail, (*prefix, *self.path), self.param)


@contextlib.contextmanager
def at_path(*prefix: Any) -> Iterator[None]:
    """Re-raise ``InputError`` from the block with ``prefix`` prepended to its path."""
    try:
        yield
    except InputError as err:
        raise err.within(*map(str, prefix)) from None


def describe(x: Any) -> str:
    """``'(32, 784) float32'`` for an array-like, a short type name otherwise."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"
    return type(x).__name__


def require_floating(owner: str, x: Any, what: str = "input x") -> None:
    """Raise ``InputError`` unless ``x`` is a floating-point array."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(owner, f"{what} must be a floating-point array, received {describe(x)}. "
                                f"Cast it first, e.g. x.astype(jnp.float32).")


def check_params(owner: str, params: Any, expected: dict[str, tuple[int, ...]], x: Any,
                 hint: Callable[[str, Any], str] | None = None) -> None:
    """Raise ``InputError`` unless ``params`` is a dict with exactly the ``expected`` keys,
    each a floating array of the expected shape; ``hint(name, value)`` may add advice."""
    if not hasattr(params, "keys") or set(params.keys()) != set(expected):
        got = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
        raise InputError(owner, f"params must be a dict with keys {sorted(expected)}, received {got}")
    for name, shape in expected.items():
        value = params[name]
        if tuple(getattr(value, "shape", ())) != tuple(shape) or not hasattr(value, "shape"):
            extra = hint(name, value) if hint is not None and hasattr(value, "shape") else ""
            raise InputError(owner, f"expected shape {tuple(shape)} (input x {describe(x)}), received "
                                    f"{describe(value)}{extra}", param=name)
        require_floating(owner, value, what=f"parameter '{name}'")


def is_concrete(x: Any) -> bool:
    """Whether ``x`` holds values (not a tracer inside ``jit``/``vmap``): checks on values run only then."""
    return not isinstance(x, jax.core.Tracer)


def require_key(owner: str, key: Any, what: str = "key") -> None:
    """Raise ``InputError`` unless ``key`` is a JAX PRNG key (``jax.random.key(0)`` or the raw
    ``jax.random.PRNGKey(0)``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is not None and dtype == jnp.uint32 and getattr(key, "ndim", 0) >= 1 and key.shape[-1] in (2, 4):
        return
    raise InputError(owner, f"{what} must be a JAX random key, e.g. jax.random.key(0) or jax.random.PRNGKey(0), "
                            f"received {describe(key) if dtype is not None else repr(key)}")


def path_name(key_path) -> str:
    """``'1/block/w'`` for a key path from ``jax.tree_util.tree_flatten_with_path``."""
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def require_number(owner: str, name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                   high: float | None = None, high_open: bool = False) -> float:
    """``value`` as a float, after checking it is a finite real number within the bounds given;
    raises ``TypeError`` for a non-number (a string, say) and ``ValueError`` otherwise. A traced
    scalar (a hyperparameter swept under ``vmap``/``jit``) cannot be checked and passes as it is."""
    if isinstance(value, jax.core.Tracer) and value.shape == ():
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) and not (
            hasattr(value, "shape") and getattr(value, "shape", None) == ()):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    bounds = ""
    if low is not None or high is not None:
        bounds = f" in {'(' if low_open else '['}{'-inf' if low is None else low}, " \
                 f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"{owner}: {name} must be a finite number{bounds}, got {value!r}")
    return number


def require_no_params(owner: Any, params: PyTree) -> None:
    """Parameter-free layers take ``{}`` (or any pytree without leaves) as params."""
    if jax.tree_util.tree_leaves(params):
        raise InputError(repr(owner), f"this layer has no parameters and expects {{}}, "
                                      f"received a pytree with leaves: {jax.tree_util.tree_map(describe, params)}")


def tree_mismatch(reference: PyTree, other: PyTree) -> tuple[str, str] | None:
    """``None`` if ``other`` has ``reference``'s tree structure and leaf shapes; else
    ``(path, what differs)`` with the first path at fault. Structures and shapes only: free under
    ``jit`` after tracing."""
    r_leaves, r_def = jax.tree_util.tree_flatten_with_path(reference)
    o_leaves, o_def = jax.tree_util.tree_flatten_with_path(other)
    if r_def == o_def:
        for (path, r), (_, o) in zip(r_leaves, o_leaves, strict=True):
            if tuple(getattr(o, "shape", ())) != tuple(getattr(r, "shape", ())):
                return path_name(path), f"at '{path_name(path)}' expected {describe(r)}, received {describe(o)}"
        return None
    r_paths = [path_name(p) for p, _ in r_leaves]
    o_paths = [path_name(p) for p, _ in o_leaves]
    missing = [p for p in r_paths if p not in o_paths]
    extra = [p for p in o_paths if p not in r_paths]
    if missing or extra:
        more = lambda items: f"{items[:5]}{' ...' if len(items) > 5 else ''}"
        return (missing or extra)[0], f"missing {more(missing)}, unexpected {more(extra)}"
    return (r_paths or [""])[0], f"other containers: expected {r_def}, received {o_def}"
