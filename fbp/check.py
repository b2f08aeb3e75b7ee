"""Verification: every hand-written backward rule against JAX autodiff and finite differences.

This is the only module of fbp that calls JAX's autodiff, and only as the independent
reference. Each check reduces the rule to the gradient of a scalar function ``f`` of the
differentiable inputs, built from the *plain* forward (``apply``, never a custom_vjp):

=========  =========================================  ====================================
check      f                                          fbp's side
=========  =========================================  ====================================
layer      ``Σ apply(params, x) ⊙ d_y`` (random d_y)  ``layer.backward(res, d_y)``
loss       ``g · loss(pred, target)``                 ``loss.backward(res, g)``
model      ``loss(model.apply(params, x), y)``        ``fbp.value_and_grad(model, loss)``
=========  =========================================  ====================================

A layer that writes forward mode (``fbp.linear_pass``) gets one more row in a float64 check,
``tangent``: its tangent rule in a random direction against ``jax.jvp`` of the same plain
forward (float32 and jit are exercised through the GGN products, ``tests/test_linear_pass.py``).

and compares, leaf by leaf (every parameter path and the input cotangent ``x``):

* **jax** — ``jax.grad(f)``. Error: ``max |actual - desired|`` and the normwise relative error
  ``max |actual - desired| / max(max |actual|, max |desired|)``; the worst index is where the
  absolute error peaks. Passes when the relative error ``<= rtol`` (default 1e-10 in float64,
  1e-5 in float32) or the absolute error ``<= atol``, by default ``rtol`` times the largest
  gradient entry of the whole check — so a leaf whose exact gradient is zero (a bias just
  before a BatchNorm) is judged against the scale of the gradient, not of its own noise.
* **fd** — central differences along random unit directions ``v``:
  ``(f(θ + h v) - f(θ - h v)) / 2h`` against ``⟨actual, v⟩``, with ``h = ε^{1/3} max(1, |θ|_∞)``
  (``ε`` the dtype's machine epsilon); error relative to ``‖actual‖₂``. Passes at ``fd_rtol``
  (1e-6 in float64, 1e-2 in float32), or an error below ``fd_rtol`` times the gradient scale.
  Differences are meaningless at a kink: pass ``fd=False`` for inputs placed exactly on one.

Checks run in float64 by default (inputs are cast; x64 is enabled only inside the check).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fbp.compare import (
    cast,
    check_settings,
    compare_fd,
    compare_jax,
    default_tolerances,
    is_float,
    refuse_half,
    standard_normal,
    with_precision,
)
from fbp.core import Layer, Loss, path_name, require_floating, run_forward, value_grad_and_output
from fbp.deviation import deviations, reference_model
from fbp.linear_pass import has_tangent, tangent
from fbp.report import Report, Row, format_table  # noqa: F401  (fbp.check.Report is the public name)

PyTree = Any


_MISSING = object()  # a parameter path fbp's gradient has no entry for


def _run(subject: str, f: Callable, fbp_grad: Callable, args: PyTree, *, dtype, jit, rtol, atol, fd, fd_rtol,
         fd_directions, key) -> Report:
    """Compare ``fbp_grad(args)`` with ``jax.grad(f)(args)`` and with differences of ``f``.

    A leaf that fbp's rule leaves out (``None``, a missing key) or returns in another shape is
    a failed row (``worst index`` says what is wrong), never a crash inside the comparison."""
    actual = (jax.jit(fbp_grad) if jit else fbp_grad)(args)
    desired = jax.jit(jax.grad(f))(args)
    f = jax.jit(f)
    d_paths = jax.tree_util.tree_flatten_with_path(desired)[0]
    a_items = {path_name(p): a for p, a in
               jax.tree_util.tree_flatten_with_path(actual, is_leaf=lambda v: v is None)[0]}
    d_names = [path_name(p) for p, _ in d_paths]
    # A leaf whose gradient is (nearly) zero next to the others — a bias before a BatchNorm —
    # carries only rounding noise of the size of the whole gradient: judge it on that scale.
    scale = max((float(jnp.max(jnp.abs(d))) for _, d in d_paths if np.size(d)), default=0.0)
    atol = rtol * scale if atol is None else atol
    single_x = "x/0" in d_names and not any(n.startswith("x/1") for n in d_names)
    rows = []
    for i, (path_text, (_, d)) in enumerate(zip(d_names, d_paths, strict=True)):
        name = path_text.removeprefix("params/")
        name = "x" if name == "x/0" and single_x else name
        a = a_items.get(path_text, _MISSING)
        if a is _MISSING or a is None or not hasattr(a, "shape"):
            what = "missing" if a is _MISSING else ("None" if a is None else type(a).__name__)
            rows.append(Row(name, "jax", math.inf, math.inf, f"fbp returned {what}", math.nan, math.nan, False,
                            math.inf))
            continue
        rows.append(compare_jax(name, a, d, rtol, atol))
        if fd and np.size(a) and tuple(a.shape) == tuple(np.shape(d)):
            rows.append(compare_fd(name, f, args, i, a, jax.random.fold_in(key, i), fd_directions, fd_rtol,
                                    fd_rtol * scale))
    for path_text, a in a_items.items():
        if path_text not in d_names and a is not None:
            rows.append(Row(path_text.removeprefix("params/"), "jax", math.inf, math.inf,
                            "fbp returned a leaf with no parameter", math.nan, math.nan, False, math.inf))
    return Report(subject, "as given" if dtype is None else jnp.dtype(dtype).name, tuple(rows))


def _by_design(model: Layer) -> tuple[Layer, tuple[str, ...]]:
    """The model the reference differentiates, and the report's notes: a layer whose rule deviates
    from the gradient by design (feedback alignment, a straight-through estimator, a cotangent
    hook) is differentiated through its ``reference_apply`` — its own equation in plain JAX."""
    found = deviations(model)
    if not found:
        return model, ()
    notes = tuple(f"  by design at path '{path or '<root>'}': {layer.deviation} — reference: JAX's gradient of the "
                  f"rule's own equation (reference_apply), not of the plain forward" for path, layer in found)
    return reference_model(model), (*notes, "  finite differences skipped: the rule is not the derivative of the "
                                             "forward")


def _tangent_row(layer, reference, args, inputs, ctx, key, rtol, atol, jit) -> Row:
    """The layer's tangent rule (``fbp.linear_pass``) in a random direction of its params and
    floating inputs, against ``jax.jvp`` of the reference's plain ``apply`` (the row ``tangent``)."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    direction = jax.tree_util.tree_unflatten(treedef, [standard_normal(jax.random.fold_in(key, 7919 + i), a.shape,
                                                                       a.dtype) for i, a in enumerate(leaves)])

    def ours(a, d):
        _, res = run_forward(layer, a["params"], inputs.rebuild(a), **ctx)
        out = tangent(layer, res, d["params"], inputs.rebuild_tangent(d))
        return jnp.zeros(y.shape, y.dtype) if out is None else out

    y, desired = jax.jit(lambda a, d: jax.jvp(lambda q: reference.apply(q["params"], inputs.rebuild(q), **ctx),
                                                (a,), (d,)))(args, direction)
    actual = (jax.jit(ours) if jit else ours)(args, direction)
    scale = float(jnp.max(jnp.abs(desired))) if desired.size else 0.0
    return compare_jax("tangent", actual, desired, rtol, rtol * scale if atol is None else atol)


class _Inputs:
    """The floating leaves of a layer's input pytree (``x``, or ``(x, h0)``, or ``(x, mask)``):
    those are differentiated; integer and boolean leaves (ids, masks) are held fixed."""

    def __init__(self, x):
        self.leaves, self.treedef = jax.tree_util.tree_flatten(x)
        self.floating = [i for i, leaf in enumerate(self.leaves) if is_float(leaf)]

    def args(self, params):
        if not self.floating:
            return {"params": params}
        return {"params": params, "x": [self.leaves[i] for i in self.floating]}

    def rebuild(self, a):
        leaves = list(self.leaves)
        for j, i in enumerate(self.floating):
            leaves[i] = a["x"][j]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def rebuild_tangent(self, d):
        """A tangent of the input for ``fbp.linear_pass``: the floating leaves' from ``d["x"]``,
        ``None`` at the others (and ``None`` for an input with no floating leaf)."""
        if "x" not in d:
            return None
        leaves = [None] * len(self.leaves)
        for j, i in enumerate(self.floating):
            leaves[i] = d["x"][j]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def select(self, d_x):
        """fbp's input cotangent, restricted to the floating leaves (None marks the others)."""
        leaves = jax.tree_util.tree_flatten(d_x, is_leaf=lambda v: v is None)[0]
        return [leaves[i] for i in self.floating]


# --------------------------------------------------------------------------- public checks
def layer(layer: Layer, params: PyTree, x, *, d_y=None, state=None, key=None, train: bool = False, seed: int = 0,
          dtype=jnp.float64, jit: bool = False, rtol: float | None = None, atol: float | None = None, fd: bool = True,
          fd_rtol: float | None = None, fd_directions: int = 2) -> Report:
    """Check ``layer.backward`` (every parameter path and the input cotangent ``x``).

    Args:
        layer: the layer under test (a built-in one or your own).
        params: its parameters.
        x: an input batch (an array, or a pytree such as ``(x, h0)`` or ``(x, mask)``; only its
            floating leaves are differentiated).
        d_y: the output cotangent; default a standard normal draw (from ``seed``).
        state: the forward's state, for layers that keep one (BatchNorm); the reference
            differentiates ``apply`` with the same state, key and mode.
        key: the forward's random key, for random layers (Dropout).
        train: training mode (batch statistics, dropout masks).
        seed: randomness of the check itself (``d_y`` and the difference directions).
        dtype: cast floating inputs to this dtype (default float64); ``None`` keeps them.
        jit: run fbp's forward and backward under ``jax.jit``.
        rtol: relative tolerance against JAX's gradient (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance (default ``rtol`` times the largest gradient entry of the check).
        fd: also compare with central finite differences (pass False for inputs on a kink).
        fd_rtol: tolerance of the finite-difference comparison (1e-6 in float64, 1e-2 in float32).
        fd_directions: random directions per leaf for the finite differences.

    Returns:
        A ``Report``: ``str(report)`` is the table (one row per parameter path and reference),
        ``report.ok`` the verdict.
    """
    check_settings(dtype, {"rtol": rtol, "atol": atol, "fd_rtol": fd_rtol}, fd_directions)
    check_key = jax.random.PRNGKey(seed)

    def body():
        p, xx, ss = cast(params, dtype), cast(x, dtype), cast(state, dtype)
        ctx = {"state": ss, "key": key, "train": train}
        y = jax.eval_shape(lambda p_, x_: layer.apply(p_, x_, **ctx), p, xx)
        refuse_half(y.dtype)
        cot = standard_normal(check_key, y.shape, y.dtype) if d_y is None else cast(d_y, dtype)
        inputs = _Inputs(xx)
        args = inputs.args(p)
        reference, notes = _by_design(layer)

        def f(a):
            return jnp.vdot(reference.apply(a["params"], inputs.rebuild(a), **ctx), cot)

        def fbp_grad(a):
            _, res = run_forward(layer, a["params"], inputs.rebuild(a), **ctx)
            d_params, d_x = layer.backward(res, cot)
            return {"params": d_params, "x": inputs.select(d_x)} if "x" in a else {"params": d_params}

        rt, frt = default_tolerances(y.dtype, rtol, fd_rtol)
        report = _run(f"fbp.check.layer: {layer!r}", f, fbp_grad, args, dtype=dtype, jit=jit, rtol=rt, atol=atol,
                      fd=fd and not notes, fd_rtol=frt, fd_directions=fd_directions, key=check_key)
        if has_tangent(layer) and y.dtype == jnp.float64:  # forward mode too, where the family writes it
            report = dataclasses.replace(report, rows=(*report.rows, _tangent_row(layer, reference, args, inputs, ctx,
                                                                                     check_key, rt, atol, jit)))
        return dataclasses.replace(report, notes=notes)

    return with_precision(dtype, body)


def loss(loss: Loss, pred, target, *, g=None, seed: int = 0, dtype=jnp.float64, jit: bool = False,
         rtol: float | None = None, atol: float | None = None, fd: bool = True, fd_rtol: float | None = None,
         fd_directions: int = 2) -> Report:
    """Check ``loss.backward`` against ``jax.grad`` of ``g · loss(pred, target)``.

    Args:
        loss: the loss under test.
        pred: a batch of predictions (differentiated).
        target: the targets (held fixed).
        g: the cotangent of the value: default 1.0, or for ``reduction="none"`` a standard
            normal draw of shape ``(N,)`` (from ``seed``).
        seed: randomness of the check itself (the difference directions, and ``g``).
        dtype: cast floating inputs to this dtype (default float64); ``None`` keeps them.
        jit: run fbp's rules under ``jax.jit``.
        rtol: relative tolerance against JAX's gradient (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance (default ``rtol`` times the largest gradient entry of the check).
        fd: also compare with central finite differences (pass False for inputs on a kink).
        fd_rtol: tolerance of the finite-difference comparison (1e-6 in float64, 1e-2 in float32).
        fd_directions: random directions per leaf for the finite differences.

    Returns:
        A ``Report``: ``str(report)`` is the table, ``report.ok`` the verdict.
    """
    check_settings(dtype, {"rtol": rtol, "atol": atol, "fd_rtol": fd_rtol}, fd_directions)
    key = jax.random.PRNGKey(seed)

    def body():
        p, t = cast(pred, dtype), cast(target, dtype)
        require_floating(f"fbp.check.loss: {loss!r}", p, what="prediction")
        refuse_half(p.dtype)
        if g is None:
            gg = standard_normal(key, p.shape[:1], p.dtype) if loss.reduction == "none" else jnp.ones((), p.dtype)
        else:
            gg = cast(jnp.asarray(g), dtype)
        rt, frt = default_tolerances(p.dtype, rtol, fd_rtol)

        def f(a):
            return jnp.vdot(loss(a["pred"], t), gg) if gg.ndim else gg * loss(a["pred"], t)

        def fbp_grad(a):
            _, res = loss.forward(a["pred"], t)
            return {"pred": loss.backward(res, gg)}

        return _run(f"fbp.check.loss: {loss!r}", f, fbp_grad, {"pred": p}, dtype=dtype, jit=jit, rtol=rt, atol=atol,
                    fd=fd, fd_rtol=frt, fd_directions=fd_directions, key=key)

    return with_precision(dtype, body)


def model(model: Layer, loss: Loss, params: PyTree, x, y, *, state=None, key=None, train: bool = True,
          seed: int = 0, dtype=jnp.float64, jit: bool = False, rtol: float | None = None, atol: float | None = None,
          fd: bool = True, fd_rtol: float | None = None, fd_directions: int = 2) -> Report:
    """Check fbp's backward transform against ``jax.grad`` of the plain composition
    ``loss(model.apply(params, x, state=state, key=key, train=train), y)`` (training mode by
    default, as ``fbp.value_and_grad``).

    Layers that deviate from the gradient by design (``fbp.credit``, ``fbp.nn.hooks``,
    ``fbp.nn.quantize``) are differentiated through their own equations (``reference_apply``);
    the report names their paths (``report.notes``) and skips finite differences.

    Args:
        model: the network.
        loss: a mean- or sum-reduced loss.
        params: the network's parameters (every path is compared).
        x: an input batch.
        y: the targets.
        state: the model's state, for models that keep one.
        key: the forward's random key, for random layers.
        train: training mode (default, as ``fbp.value_and_grad``).
        seed: randomness of the check itself (the difference directions).
        dtype: cast floating inputs to this dtype (default float64); ``None`` keeps them.
        jit: run fbp's rules under ``jax.jit``.
        rtol: relative tolerance against JAX's gradient (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance (default ``rtol`` times the largest gradient entry of the check).
        fd: also compare with central finite differences (pass False for inputs on a kink).
        fd_rtol: tolerance of the finite-difference comparison (1e-6 in float64, 1e-2 in float32).
        fd_directions: random directions per leaf for the finite differences.

    Returns:
        A ``Report``: ``str(report)`` is the table, ``report.ok`` the verdict.
    """
    check_settings(dtype, {"rtol": rtol, "atol": atol, "fd_rtol": fd_rtol}, fd_directions)
    check_key = jax.random.PRNGKey(seed)

    def body():
        p, xx, yy, ss = cast(params, dtype), cast(x, dtype), cast(y, dtype), cast(state, dtype)
        ctx = {"state": ss, "key": key, "train": train}
        dt = jax.tree_util.tree_leaves(p)[0].dtype if jax.tree_util.tree_leaves(p) else xx.dtype
        refuse_half(dt)
        rt, frt = default_tolerances(dt, rtol, fd_rtol)
        reference, notes = _by_design(model)

        def f(a):
            return loss(reference.apply(a["params"], xx, **ctx), yy)

        def fbp_grad(a):
            return {"params": value_grad_and_output(model, loss, a["params"], xx, yy, **ctx)[1]}

        report = _run(f"fbp.check.model: {model!r} with {loss!r}", f, fbp_grad, {"params": p}, dtype=dtype, jit=jit,
                      rtol=rt, atol=atol, fd=fd and not notes, fd_rtol=frt, fd_directions=fd_directions, key=check_key)
        return dataclasses.replace(report, notes=notes)

    return with_precision(dtype, body)


def assert_layer(*args, **kwargs) -> Report:
    """``fbp.check.layer``, raising ``AssertionError`` with the report's table on any failure (for pytest).

    Args:
        *args: the positional arguments of ``fbp.check.layer``.
        **kwargs: its keyword arguments.

    Returns:
        The layer report, when every row passes.

    Raises:
        AssertionError: a row failed; the message is the whole table.
    """
    return layer(*args, **kwargs).assert_ok()


def assert_loss(*args, **kwargs) -> Report:
    """``fbp.check.loss``, raising ``AssertionError`` with the report's table on any failure (for pytest).

    Args:
        *args: the positional arguments of ``fbp.check.loss``.
        **kwargs: its keyword arguments.

    Returns:
        The loss report, when every row passes.

    Raises:
        AssertionError: a row failed; the message is the whole table.
    """
    return loss(*args, **kwargs).assert_ok()


def assert_model(*args, **kwargs) -> Report:
    """``fbp.check.model``, raising ``AssertionError`` with the report's table on any failure (for pytest).

    Args:
        *args: the positional arguments of ``fbp.check.model``.
        **kwargs: its keyword arguments.

    Returns:
        The model report, when every row passes.

    Raises:
        AssertionError: a row failed; the message is the whole table.
    """
    return model(*args, **kwargs).assert_ok()


def curvature_references(model: Layer, loss: Loss, params, x, y, v=None) -> dict:
    """The dense autodiff references of ``fbp.check.curvature``.

    Evaluation mode, with dense ``J = ∂ apply/∂θ`` (``jax.jacrev``) and ``H = ∇²_pred loss``
    (``jax.hessian``): for small models only.

    Args:
        model: the model.
        loss: the loss.
        params: the params.
        x: the inputs.
        y: the targets.
        v: a params-shaped direction for the GGN-vector product, or ``None``.

    Returns:
        ``{"diag_ggn": diag(Jᵀ H J), "diag_hessian": diag(∇²_θ (loss ∘ apply))}``, plus
        ``"ggn_vector_product": Jᵀ H J v`` and ``"hessian_vector_product": ∇²_θ (loss ∘ apply) v``
        with ``v``; each shaped like ``params``.
    """
    flat, unravel = ravel_pytree(params)
    apply = lambda f: model.apply(unravel(f), x)  # noqa: E731
    pred = apply(flat)
    jac = jax.jacrev(apply)(flat).reshape(pred.size, flat.size)
    hess = jax.hessian(lambda z: loss(z, y))(pred).reshape(pred.size, pred.size)
    full = jax.hessian(lambda f: loss(apply(f), y))(flat)
    out = {"diag_ggn": unravel(jnp.einsum("pi,pq,qi->i", jac, hess, jac)), "diag_hessian": unravel(jnp.diag(full))}
    if v is not None:
        out["ggn_vector_product"] = unravel(jac.T @ (hess @ (jac @ ravel_pytree(v)[0])))
        out["hessian_vector_product"] = unravel(full @ ravel_pytree(v)[0])
    return out


from fbp.check_curvature import assert_curvature, curvature  # noqa: E402,F401  (fbp.check.curvature)
