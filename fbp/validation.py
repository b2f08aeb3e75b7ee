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
        text = f"{short_repr(self.owner)} at path '{where}': "
        if self.param is not None:
            text += f"parameter '{'/'.join((*self.path, self.param))}' "
        return text + self.detail

    def within(self, *prefix: str) -> InputError:
        """The same error, seen from a parent that holds this layer at ``prefix``."""
        return InputError(self.owner, self.detail, (*prefix, *self.path), self.param)


OWNER_LENGTH = 120


def short_repr(text: str, limit: int = OWNER_LENGTH) -> str:
    """A layer's (or model's) repr cut to ``limit`` characters for an error message: a whole model's
    repr runs to kilobytes, and the path already says where.

    Args:
        text: the repr.
        limit: the longest text kept.

    Returns:
        ``text``, or its start with ``...`` and the closing parenthesis.
    """
    return text if len(text) <= limit else text[:limit - 5].rstrip(", ") + ", ...)"


@contextlib.contextmanager
def at_path(*prefix: Any) -> Iterator[None]:
    """Re-raise ``InputError`` from the block with ``prefix`` prepended to its path.

    Combinators wrap each child's call in ``with at_path(i):`` so an error deep inside a model
    reads ``Dense(...) at path '2/block/0'``.

    Args:
        *prefix: the path parts of the child, outermost first (converted with ``str``).

    Yields:
        Nothing; the block runs inside the context.

    Raises:
        InputError: the block's error, with ``prefix`` prepended to its path.
    """
    try:
        yield
    except InputError as err:
        raise err.within(*map(str, prefix)) from None


def describe(x: Any) -> str:
    """A short description of a value for error messages.

    Args:
        x: anything; arrays and tracers are described by shape and dtype.

    Returns:
        ``'(32, 784) float32'`` for an array-like, the type's name otherwise.
    """
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{tuple(x.shape)} {jnp.dtype(x.dtype).name}"
    return type(x).__name__


def require_floating(owner: str, x: Any, what: str = "input x") -> None:
    """Raise ``InputError`` unless ``x`` is a floating-point array.

    Args:
        owner: the repr of the layer or loss that received ``x``.
        x: the value to check.
        what: how the message names ``x`` (``'input x'``, ``"parameter 'w'"``).

    Raises:
        InputError: ``x`` has no dtype or an integer/boolean dtype.
    """
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(owner, f"{what} must be a floating-point array, received {describe(x)}. "
                                f"Cast it first, e.g. x.astype(jnp.float32).")


def check_params(owner: str, params: Any, expected: dict[str, tuple[int, ...]], x: Any,
                 hint: Callable[[str, Any], str] | None = None) -> None:
    """Check a layer's parameter dict against the shapes its input implies.

    Args:
        owner: the repr of the layer.
        params: the parameters received.
        expected: every key the layer needs, mapped to the shape its input ``x`` implies.
        x: the layer's input, named in the message so the user sees which shape led to which.
        hint: optional ``hint(name, value) -> str`` that adds advice to a shape mismatch
            (e.g. "a transposed kernel?").

    Raises:
        InputError: ``params`` is not a dict with exactly the ``expected`` keys, or a value has the
            wrong shape or is not floating point; the message names the parameter's path.
    """
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
    """Whether ``x`` holds values (not a tracer inside ``jit``/``vmap``); checks on values run only then.

    Args:
        x: any value.

    Returns:
        ``False`` for a JAX tracer, ``True`` otherwise.
    """
    return not isinstance(x, jax.core.Tracer)


def require_key(owner: str, key: Any, what: str = "key") -> None:
    """Raise ``InputError`` unless ``key`` is a JAX PRNG key.

    Args:
        owner: the repr of the layer, loss or function that needs the key.
        key: a typed key (``jax.random.key(0)``) or a raw ``uint32`` key (``jax.random.PRNGKey(0)``).
        what: how the message names the argument.

    Raises:
        InputError: ``key`` is ``None``, an integer or any other array.
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return
    if dtype is not None and dtype == jnp.uint32 and getattr(key, "ndim", 0) >= 1 and key.shape[-1] in (2, 4):
        return
    raise InputError(owner, f"{what} must be a JAX random key, e.g. jax.random.key(0) or jax.random.PRNGKey(0), "
                            f"received {describe(key) if dtype is not None else repr(key)}")


def path_name(key_path) -> str:
    """A readable name for a pytree key path.

    Args:
        key_path: a key path from ``jax.tree_util.tree_flatten_with_path``.

    Returns:
        ``'1/block/w'``: the dict keys, sequence indices and attribute names joined by ``/``.
    """
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
    """Check a hyperparameter is a finite real number within bounds.

    A traced scalar (a hyperparameter swept under ``vmap``/``jit``) cannot be checked and passes
    as it is.

    Args:
        owner: the function or class that received the value (for the message).
        name: the argument's name.
        value: the value received.
        low: the lower bound, or ``None`` for none.
        low_open: exclude ``low`` itself.
        high: the upper bound, or ``None`` for none.
        high_open: exclude ``high`` itself.

    Returns:
        ``value`` as a Python float (a traced scalar unchanged).

    Raises:
        TypeError: ``value`` is not a number (a string, a bool, a list).
        ValueError: ``value`` is not finite or lies outside the bounds.
    """
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


def require_int(owner: str, name: str, value: Any, *, low: int | None = None) -> int:
    """Check an integer argument (a seed, a count, a size): a Python or NumPy int, not a bool.

    Args:
        owner: the function or class that received the value (for the message).
        name: the argument's name.
        value: the value received.
        low: the smallest value allowed, or ``None``.

    Returns:
        ``value`` as a Python int.

    Raises:
        TypeError: ``value`` is not an int (a float such as 10.5, a string, a bool).
        ValueError: ``value`` is below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an int{'' if low is None else f' >= {low}'}, got "
                        f"{type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def require_bool(owner: str, name: str, value: Any) -> bool:
    """Check a flag is ``True`` or ``False`` (a string such as ``"no"`` is truthy and would be taken as True).

    Args:
        owner: the function or class that received the value (for the message).
        name: the argument's name.
        value: the value received.

    Returns:
        ``value`` as a Python bool.

    Raises:
        TypeError: anything but a bool (NumPy's included).
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{owner}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def typed_arguments(fn: Callable) -> Callable:
    """Check a public function's plain arguments against its annotations before it runs: a
    ``bool`` parameter takes a bool (``"no"`` is truthy), an ``int`` parameter an int (not 2.5,
    not a bool), a ``float`` parameter a real number (not text); ranges stay the function's own
    checks. The signature and docstring are kept.

    Args:
        fn: the function (its annotations read as text, ``from __future__ import annotations``).

    Returns:
        The checked function.
    """
    import functools
    import inspect

    signature = inspect.signature(fn)
    kinds = {name: _FIELD_CHECKS.get(str(p.annotation)) for name, p in signature.parameters.items()}
    kinds = {name: kind for name, kind in kinds.items() if kind is not None}

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            kind = kinds.get(name)
            if kind is None or value is None or isinstance(value, jax.core.Tracer):
                continue
            if kind == "bool":
                require_bool(fn.__name__, name, value)
            elif kind == "int":
                require_int(fn.__name__, name, value)
            elif isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    and getattr(value, "shape", None) != ():
                raise TypeError(f"{fn.__name__}: {name} must be a number, got {type(value).__name__} {value!r}")
        return fn(*args, **kwargs)

    return checked


_FIELD_CHECKS = {"bool": "bool", "int": "int", "float": "float", "int | None": "int", "float | None": "float",
                 "bool | None": "bool"}


def check_fields(obj: Any) -> None:
    """Check a dataclass's plain fields against their annotations: a ``bool`` field holds a bool,
    an ``int`` field an int (not a bool, not 2.5), a ``float`` field a finite real number (``None``
    where the annotation allows it). Layers, losses and settings call it first in
    ``__post_init__``; their own range checks follow.

    Args:
        obj: a dataclass instance.

    Raises:
        TypeError: a value of the wrong type, naming the field.
        ValueError: a float field that is NaN or infinite.
    """
    import dataclasses

    owner = type(obj).__name__
    for field in dataclasses.fields(obj):
        kind = _FIELD_CHECKS.get(str(field.type).replace("Optional[", "").rstrip("]"))
        value = getattr(obj, field.name)
        if kind is None or (value is None and "None" in str(field.type)):
            continue
        if kind == "bool":
            require_bool(owner, field.name, value)
        elif kind == "int":
            require_int(owner, field.name, value)
        else:
            require_number(owner, field.name, value)


def require_no_params(owner: Any, params: PyTree) -> None:
    """Raise ``InputError`` unless a parameter-free layer received ``{}`` (or a pytree without leaves).

    Args:
        owner: the layer.
        params: the parameters received.

    Raises:
        InputError: ``params`` has array leaves; the message shows their shapes.
    """
    if jax.tree_util.tree_leaves(params):
        raise InputError(repr(owner), f"this layer has no parameters and expects {{}}, "
                                      f"received a pytree with leaves: {jax.tree_util.tree_map(describe, params)}")


def tree_mismatch(reference: PyTree, other: PyTree) -> tuple[str, str] | None:
    """The first difference between two pytrees' structures and leaf shapes.

    Structures and shapes only, so it is free under ``jit`` after tracing.

    Args:
        reference: the pytree with the expected structure (e.g. the params).
        other: the pytree to compare (e.g. a gradient returned by a custom rule).

    Returns:
        ``None`` if they agree; otherwise ``(path, what differs)`` with the first path at fault.
    """
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


def require_state_mode(model: Any, has_state: bool, caller: str) -> None:
    """Refuse ``has_state=False`` for a model that keeps state: its new state would be lost.

    Args:
        model: the model.
        has_state: what the caller was asked for.
        caller: the public function's name, for the message.

    Raises:
        InputError: naming the stateful layers' paths and the call to use instead.
    """
    if model.has_state and not has_state:
        from fbp.walk import leaf_layers  # walk imports this module

        paths = [p or "<root>" for p, leaf in leaf_layers(model) if leaf.has_state]
        raise InputError(repr(model), f"{caller} without has_state=True would throw away the new state of "
                                      f"the stateful layers at {paths} (e.g. BatchNorm's running statistics). "
                                      f"Use {caller}(..., has_state=True) and pass state=model.init_state(params) "
                                      f"in, then keep the new state it returns")


def require_state(model: Any, state: Any, caller: str) -> None:
    """Refuse ``state=None`` where ``has_state=True`` promises a new state back.

    Args:
        model: the model.
        state: the state received.
        caller: the public function's name, for the message.

    Raises:
        InputError: ``state`` is ``None``.
    """
    if state is None:
        raise InputError(repr(model), f"{caller} with has_state=True needs the model's state as its second "
                                      f"argument: f(params, state, x, y) with state = model.init_state(params) "
                                      f"(then the state each call returns); received None")
