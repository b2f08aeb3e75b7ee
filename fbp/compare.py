"""Judging a gradient against a reference: the check's tolerances, its error measure, finite
differences, and the settings that would make a verdict meaningless.

``fbp.check`` and ``fbp.check.curvature`` compute the references (JAX autodiff lives only in
``fbp.check``); this module turns an (actual, desired) pair into a ``Row`` of the report.
None of it differentiates anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.report import Report, Row

PyTree = Any


def is_float(x: Any) -> bool:
    """Whether ``x`` is a floating-point array (the leaves a check differentiates).

    Args:
        x: any value.

    Returns:
        ``True`` for an array with a floating dtype.
    """
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def cast(tree: PyTree, dtype) -> PyTree:
    """Every floating leaf of ``tree`` as a JAX array of ``dtype``; other leaves as arrays, unchanged.

    Args:
        tree: a pytree of array-likes.
        dtype: the precision to check in, or ``None`` to keep the inputs' own.

    Returns:
        The cast pytree.
    """
    def one(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if dtype is not None and is_float(a) else a

    return jax.tree_util.tree_map(one, tree)


def numpy_rng(key) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key: the check's own randomness.

    The output cotangent ``d_y`` and the difference directions come from it, so no
    random-number kernel is compiled for every shape.

    Args:
        key: a JAX random key.

    Returns:
        A ``numpy.random.Generator``.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def standard_normal(key, shape, dtype) -> jax.Array:
    """A standard normal draw from ``numpy_rng(key)``.

    Args:
        key: a JAX random key.
        shape: the shape.
        dtype: the dtype.

    Returns:
        The draw as a JAX array.
    """
    return jnp.asarray(numpy_rng(key).standard_normal(shape).astype(np.dtype(dtype)))


def default_tolerances(dtype, rtol: float | None, fd_rtol: float | None) -> tuple[float, float]:
    """The tolerances a check uses where the caller gave none.

    Args:
        dtype: the precision checked in.
        rtol: the caller's tolerance against JAX, or ``None``.
        fd_rtol: the caller's tolerance against finite differences, or ``None``.

    Returns:
        ``(rtol, fd_rtol)``: by default ``(1e-10, 1e-6)`` in float64 and ``(1e-5, 1e-2)`` otherwise.
    """
    double = jnp.dtype(dtype) == jnp.float64
    return (1e-10 if double else 1e-5) if rtol is None else rtol, \
           (1e-6 if double else 1e-2) if fd_rtol is None else fd_rtol


def compare_jax(name: str, actual, desired, rtol: float, atol: float) -> Row:
    """One leaf of fbp's result against the autodiff reference.

    The error is ``max |actual - desired|``, and relative to ``max(max |actual|, max |desired|)``;
    the worst index is where the absolute error peaks. A NaN on one side only is an infinite error.

    Args:
        name: the row's path (``"2/w"``, ``"x"``).
        actual: fbp's value.
        desired: the reference.
        rtol: passes when the relative error is at most this ...
        atol: ... or the absolute error at most this.

    Returns:
        The ``Row`` (``against="jax"``); a shape mismatch is a failed row.
    """
    a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    if a.shape != d.shape:
        return Row(name, "jax", math.inf, math.inf, f"shape {a.shape} vs {d.shape}", math.nan, math.nan, False)
    if a.size == 0:
        return Row(name, "jax", 0.0, 0.0, "-", 0.0, 0.0, True, 0.0)
    err = np.abs(a - d)
    err = np.where(np.isnan(err) & ~(np.isnan(a) & np.isnan(d)), np.inf, np.nan_to_num(err, nan=0.0))
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    max_abs = float(err[worst])
    scale = max(float(np.max(np.abs(np.nan_to_num(a)))), float(np.max(np.abs(np.nan_to_num(d)))))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ok = bool(np.isfinite(max_abs) and (max_rel <= rtol or max_abs <= atol))
    error = min(max_rel, max_abs * rtol / atol) if atol > 0 else max_rel
    where = str(tuple(int(i) for i in worst)) if err.ndim else "()"
    return Row(name, "jax", max_abs, max_rel, where, float(a[worst]), float(d[worst]), ok, error)


def compare_fd(name: str, f: Callable, args: PyTree, leaf_index: int, actual, key, n_dirs: int,
               fd_rtol: float, fd_atol: float) -> Row:
    """One leaf of fbp's gradient against central differences of ``f``.

    Along ``n_dirs`` random unit directions ``v``, ``(f(θ + h v) - f(θ - h v)) / 2h`` is compared
    with ``⟨actual, v⟩``, with ``h = ε^{1/3} max(1, |θ|_∞)``; the error is relative to
    ``‖actual‖₂``. The directions and the moved points are NumPy arrays in the leaf's dtype,
    drawn from ``numpy_rng(key)`` (reproducible from the check's ``seed``).

    Args:
        name: the row's path.
        f: the jitted scalar function of ``args``.
        args: the point, a pytree.
        leaf_index: which of ``args``' leaves to move.
        actual: fbp's gradient for that leaf.
        key: a JAX random key for the directions.
        n_dirs: the number of directions.
        fd_rtol: passes when the relative error is at most this ...
        fd_atol: ... or the absolute error at most this.

    Returns:
        The worst direction's ``Row`` (``against="fd"``).
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dtype = np.dtype(leaves[leaf_index].dtype)
    theta = np.asarray(leaves[leaf_index])
    eps = float(np.finfo(dtype).eps)
    h = eps ** (1 / 3) * max(1.0, float(np.max(np.abs(theta))) if theta.size else 1.0)
    actual = np.asarray(actual, dtype)
    norm = float(np.linalg.norm(actual.ravel().astype(np.float64)))
    rng = numpy_rng(key)
    worst = None
    for i in range(n_dirs):
        v = rng.standard_normal(theta.shape).astype(dtype)
        v = v / max(np.linalg.norm(v.ravel()), np.finfo(dtype).tiny)

        def at(step, v=v):
            moved = list(leaves)
            moved[leaf_index] = (theta + dtype.type(step) * v).astype(dtype)
            return float(f(jax.tree_util.tree_unflatten(treedef, moved)))

        estimate = (at(h) - at(-h)) / (2 * h)
        directional = float(np.vdot(actual.astype(np.float64), v.astype(np.float64)))
        err = abs(directional - estimate)
        rel = err / norm if norm > 0 else (0.0 if err <= 10 * eps else math.inf)
        if not math.isfinite(err):
            rel = math.inf
        if i == 0 or rel > worst.max_rel:
            error = min(rel, err * fd_rtol / fd_atol) if fd_atol > 0 else rel
            worst = Row(name, "fd", err, rel, f"dir {i}", directional, estimate, rel <= fd_rtol or err <= fd_atol,
                        error)
    return worst


def check_settings(dtype, tolerances: dict[str, float | None], fd_directions: int) -> None:
    """Refuse settings that would make a verdict meaningless.

    Args:
        dtype: the precision to check in (a floating dtype of at least 32 bits, or ``None``).
        tolerances: ``{name: value}``; each ``None`` or a finite number ≥ 0.
        fd_directions: an int ≥ 1.

    Raises:
        ValueError: naming the setting at fault.
    """
    if dtype is not None:
        if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"fbp.check: dtype must be a floating dtype (jnp.float64, the default, or jnp.float32) "
                             f"or None to keep the inputs' own, got {jnp.dtype(dtype).name}")
        refuse_half(jnp.dtype(dtype))
    for name, value in tolerances.items():
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"fbp.check: {name} must be a finite number >= 0, got {value!r}")
    if isinstance(fd_directions, bool) or not isinstance(fd_directions, int) or fd_directions < 1:
        raise ValueError(f"fbp.check: fd_directions must be an int >= 1, got {fd_directions!r}")


def refuse_half(dtype) -> None:
    """Refuse to judge gradients in a 16-bit dtype.

    Args:
        dtype: the dtype the check would run in.

    Raises:
        ValueError: its rounding swamps both references; check in float64 or float32.
    """
    if jnp.dtype(dtype).itemsize < 4:
        raise ValueError(f"fbp.check: cannot judge gradients in {jnp.dtype(dtype).name}: its rounding (eps "
                         f"{float(jnp.finfo(dtype).eps):.1e}) swamps both references, and finite differences need "
                         f"more digits. Check in float64 (the default) or float32: the rules are the same code")


def with_precision(dtype, body: Callable[[], Report]) -> Report:
    """Run a check's body with x64 enabled when it checks in float64 (and only then).

    Args:
        dtype: the precision checked in.
        body: the check, a thunk.

    Returns:
        What ``body`` returns.
    """
    if dtype is not None and jnp.dtype(dtype) == jnp.float64:
        with jax.enable_x64(True):
            return body()
    return body()
