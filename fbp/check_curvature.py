"""``fbp.check.curvature``: fbp's curvature (``fbp.curvature``) against JAX autodiff of the plain
forward. The autodiff itself stays in ``fbp/check.py`` (``curvature_references``), the one
place in ``fbp/`` that calls it; this module compares and reports.

The references are dense: the model's Jacobian ``J = jacrev(apply)`` for the whole batch and
the loss's Hessian ``H = hessian(loss)`` in its prediction, so ``GGN = Jᵀ H J`` and the Hessian
``hessian(loss ∘ apply)`` are formed in full — for the small models a check runs on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp import curvature as fc
from fbp.check import curvature_references
from fbp.compare import cast, check_settings, compare_jax, default_tolerances, with_precision
from fbp.core import InputError, Layer, Loss
from fbp.nn.init import draw_by_length
from fbp.report import Report
from fbp.validation import path_name


def curvature(model: Layer, loss: Loss, params, x, y, *, seed: int = 0, dtype=jnp.float64, jit: bool = False,
              rtol: float | None = None, atol: float | None = None) -> Report:
    """Check ``diag_ggn``, ``ggn_vector_product`` (a random ``v``), where the model is a chain it
    covers ``diag_hessian``, and where every layer has a second-order rule
    ``hessian_vector_product``, against JAX autodiff (``fbp.check.curvature_references``).

    Args:
        model: the network (evaluation mode; no state).
        loss: a ``fbp.losses`` loss.
        params: the network's parameters.
        x: an input batch.
        y: the targets.
        seed: the random direction ``v``.
        dtype: cast floating inputs to this dtype (default float64).
        jit: run fbp's curvature under ``jax.jit``.
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance (default ``rtol`` times the largest entry of each quantity).

    Returns:
        A ``Report`` whose rows are ``quantity:path`` comparisons.
    """
    check_settings(dtype, {"rtol": rtol, "atol": atol}, 1)

    def body():
        p, xx, yy = cast(params, dtype), cast(x, dtype), cast(y, dtype)
        rng = jax.random.key(seed)
        v = jax.tree_util.tree_map(lambda a: draw_by_length(jax.random.normal, jax.random.fold_in(rng, a.size), a.shape,
                                                            a.dtype), p)
        ours = {"diag_ggn": _maybe_jit(fc.diag_ggn(model, loss), jit)(p, xx, yy),
                "ggn_vector_product": _maybe_jit(fc.ggn_vector_product(model, loss), jit)(p, xx, yy, v)}
        try:
            ours["diag_hessian"] = _maybe_jit(fc.diag_hessian(model, loss), jit)(p, xx, yy)
        except InputError:
            pass  # not a chain diag_hessian covers: the others are still checked
        try:
            ours["hessian_vector_product"] = _maybe_jit(fc.hessian_vector_product(model, loss), jit)(p, xx, yy, v)
        except InputError:
            pass  # a layer without a second-order rule (fbp.second_order)
        refs = jax.jit(lambda *args: curvature_references(model, loss, *args))(p, xx, yy, v)
        dt = jax.tree_util.tree_leaves(p)[0].dtype
        rt = default_tolerances(dt, rtol, None)[0]
        rows = []
        for quantity, actual in ours.items():
            desired = refs[quantity]
            d_leaves = jax.tree_util.tree_flatten_with_path(desired)[0]
            scale = max((float(jnp.max(jnp.abs(d))) for _, d in d_leaves if d.size), default=0.0)
            a_leaves = jax.tree_util.tree_leaves(actual)
            for (path, d), a in zip(d_leaves, a_leaves, strict=True):
                tol = rt * scale if atol is None else atol
                rows.append(compare_jax(f"{quantity}:{path_name(path)}", a, d, rt, tol))
        return Report(f"fbp.check.curvature: {model!r} with {loss!r}", jnp.dtype(dt).name, tuple(rows))

    return with_precision(dtype, body)


def _maybe_jit(f, jit: bool):
    return jax.jit(f) if jit else f


def assert_curvature(*args, **kwargs) -> Report:
    """``fbp.check.curvature``, raising ``AssertionError`` with the report's table on any failure (for pytest).

    Args:
        *args: the positional arguments of ``fbp.check.curvature``.
        **kwargs: its keyword arguments.

    Returns:
        The curvature report, when every row passes.

    Raises:
        AssertionError: a row failed; the message is the whole table.
    """
    return curvature(*args, **kwargs).assert_ok()
