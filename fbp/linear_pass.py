"""Forward mode: the model's Jacobian-vector product ``J v`` from hand-written tangent rules.

A layer's **tangent rule** is the transpose of its backward rule at the same residuals::

    d_y = tangent(res, d_params, d_x)   with   ⟨d_y, u⟩ = ⟨backward(res, u), (d_params, d_x)⟩  for every u

For a layer whose backward is its exact vector-Jacobian product this is the derivative of its
forward, ``d_y = ∂_θ f · d_params + ∂_x f · d_x`` (forward mode, Pearlmutter's R-operator on
the forward). For a layer whose backward is a rule by design (a straight-through estimator, a
cotangent hook, feedback alignment) it is the rule's own transpose, so ``J v`` and ``Jᵀ u``
stay adjoint and ``Jᵀ H J`` is the GGN of the rules, as before.

A family declares forward mode beside its backward, in one of three ways:

* ``tangent(res, d_params, d_x)`` — layers with params and combinators;
* ``_tangent(res, d_x)`` — parameter-free layers (``fbp.core.ParameterFree``);
* ``self_adjoint = True`` — the backward's Jacobian is symmetric (elementwise activations,
  softmax, dropout): the tangent is the backward applied to ``d_x``.

``d_x = None`` stands for a zero tangent (the model's input does not vary, or nothing before
this layer does): a rule skips the products it would multiply by zero, and returns ``None``
when its output's tangent is zero too. A declaration counts only when it is written in the
class that writes the backward, or below it: a subclass that replaces the backward without a
new tangent has none, and its model falls back.

**Why.** Without the rules ``J v`` is ``jax.linear_transpose`` of the pass's backward — correct
for every model, but XLA then runs the transposed backward's ops (for a convolution, the
transpose of its input-gradient convolution, which XLA's CPU backend runs several times slower
than the forward convolution). With them, ``J v`` costs about one forward: every GGN-vector
product, Lanczos step (``fbp.spectrum``, ``fbp.diagnostics``) and Laplace/influence product
gets cheaper (``benchmarks/bench_curvature_uses.py``). A model any of whose layers has no rule
(a cotangent map, feedback alignment) uses the transpose, whole; the results
agree to rounding (``tests/test_linear_pass.py``), and ``fbp.check.layer`` checks each rule
against the JAX forward-mode reference of the plain forward.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp

from fbp.core import Layer
from fbp.walk import children

_TRANSPOSE_ONLY = [False]


@contextlib.contextmanager
def transpose_only():
    """Within this block, every ``LinearPass`` built computes ``J v`` by transposing the backward,
    as before forward mode: to time both paths, or to rule a tangent rule out when a result
    surprises. Read when a function is traced: one jitted inside keeps the path it was traced with.

    Yields:
        Nothing.
    """
    _TRANSPOSE_ONLY[0] = True
    try:
        yield
    finally:
        _TRANSPOSE_ONLY[0] = False


def _owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s method order that defines ``name`` itself, or ``None``."""
    return next((k for k in cls.__mro__ if name in vars(k)), None)


def declares_rule(layer: Layer, names: tuple[str, ...]) -> bool:
    """Whether ``layer``'s class writes one of the rules ``names`` at or below the class that
    writes its backward (so a subclass that replaces the backward does not inherit them); also
    ``fbp.second_order``'s test for its rules.

    Args:
        layer: the layer.
        names: the rules' attribute names (``"tangent"``, ``"backward_tangent"``, …).

    Returns:
        ``True`` when one of them is written beside (or below) the backward.
    """
    cls = type(layer)
    backs = [k for k in (_owner(cls, "backward"), _owner(cls, "_backward")) if k is not None]
    backward = max(backs, key=lambda k: len(k.__mro__))  # the most derived of the two
    rules = [k for k in (_owner(cls, name) for name in names) if k is not None]
    return any(issubclass(k, backward) for k in rules)


def declares_tangent(layer: Layer) -> bool:
    """Whether ``layer`` itself (not its children) writes a tangent, or declares itself
    self-adjoint, beside its backward.

    Args:
        layer: the layer.

    Returns:
        ``True`` when it does.
    """
    names = ("tangent", "_tangent", "self_adjoint") if getattr(layer, "self_adjoint", False) else ("tangent",
                                                                                                    "_tangent")
    return declares_rule(layer, names)


def has_tangent(model: Layer) -> bool:
    """Whether every layer of ``model`` (the combinators included) has a tangent rule.

    Args:
        model: a layer or model.

    Returns:
        ``True`` when ``J v`` runs on the rules (``tangent``); else it is the transposed backward.
    """
    return declares_tangent(model) and all(has_tangent(child) for child in children(model).values())


def tangent(layer: Layer, res, d_params, d_x):
    """One layer's tangent by its declared rule (module docstring); for combinators and wrappers.

    Args:
        layer: the layer (it or its class must declare a rule: ``has_tangent``).
        res: the residuals of its forward.
        d_params: the parameters' tangent, shaped like its params.
        d_x: the input's tangent, or ``None`` for zero.

    Returns:
        The output's tangent, or ``None`` when it is zero.
    """
    if getattr(layer, "self_adjoint", False):
        return None if d_x is None else layer.backward(res, d_x)[1]
    if callable(getattr(layer, "_tangent", None)):
        return None if d_x is None else layer._tangent(res, d_x)
    return layer.tangent(res, d_params, d_x)


def add(a, b):
    """The sum of two tangents, either of which may be ``None`` (zero).

    Args:
        a: a tangent, or ``None``.
        b: a tangent, or ``None``.

    Returns:
        ``a + b``; the other one where one is ``None``; ``None`` when both are.
    """
    return b if a is None else (a if b is None else a + b)


class LinearPass:
    """The model linearised at one forward pass: ``back(u) = Jᵀu`` (the rules' backward) and
    ``back.tangent(v) = J v`` (forward mode where every layer has a rule, else the transpose).

    Args:
        model: the model.
        res: the residuals of the forward of ``layer``.
        pred: the model's output (shape and dtype of ``J v``).
        layer: the model as it ran the forward, when wrapped (the engine's probed model, whose
            params are ``(p, None)`` at every leaf); default ``model``.
        split: ``d_params -> params-shaped gradient`` for a wrapped model's backward.
        slot: ``params-shaped v -> the wrapped model's d_params`` for its tangent.
    """

    def __init__(self, model: Layer, res, pred, layer: Layer | None = None, split=None, slot=None):
        self.model, self.res, self.pred = model, res, pred
        self.layer = model if layer is None else layer
        self.split = split or (lambda d: d)
        self.slot = slot or (lambda v: v)
        self.forward_mode = has_tangent(model) and not _TRANSPOSE_ONLY[0]

    def __call__(self, u) -> Any:
        """``Jᵀ u``: the rules' backward of an output cotangent ``u``, shaped like the params."""
        return self.split(self.layer.backward(self.res, u)[0])

    def tangent(self, v) -> jax.Array:
        """``J v`` for a params-shaped ``v``: by the tangent rules, or by transposing ``__call__``."""
        if not self.forward_mode:
            return self.transposed(v)
        out = tangent(self.layer, self.res, self.slot(v), None)
        return jnp.zeros_like(self.pred) if out is None else out.astype(self.pred.dtype)

    def transposed(self, v) -> jax.Array:
        """``J v`` by ``jax.linear_transpose`` of the backward (every model; the reference path)."""
        (jv,) = jax.linear_transpose(self, self.pred)(v)
        return jv


def jacobian_vector_product(back, pred, v) -> jax.Array:
    """``J v`` from a pass's linear backward: its ``tangent`` when it is a ``LinearPass``, else
    the transpose of ``back`` (a user's extension may hand in any linear function).

    Args:
        back: ``u ↦ Jᵀu``.
        pred: the model's output.
        v: the direction, shaped like the params.

    Returns:
        ``J v``, shaped like ``pred``.
    """
    if isinstance(back, LinearPass):
        return back.tangent(v)
    (jv,) = jax.linear_transpose(back, pred)(v)
    return jv
