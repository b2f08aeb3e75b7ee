"""Hessian-vector products from hand-written rules: Pearlmutter's R-operator on fbp's own pass.

For a direction ``v`` in parameter space, ``H v = R{∇θ L}`` is the derivative of the backward
pass as the parameters move along ``v``. Forward, the layers' tangent rules (``fbp.linear_pass``)
give every layer's input tangent ``t``; then the backward runs twice per layer, right to left:
the plain backward of ``d_y`` (the gradient's cotangents) and the backward of ``r_y = R{d_y}``,
plus the layer's **second-order term** — the derivative of its backward as its residuals move
with the forward, ``d_y`` held::

    r_y(top)              = ∇²_pred loss · J v                 (the loss's Hessian factor, S Sᵀ J v)
    R{d_params}, r_x      = backward(res, r_y) + backward_tangent(res, v_layer, t, d_y)
    H v                   = R{d_params} at every layer

Dropping every second-order term leaves ``Jᵀ H_loss J v``, the GGN-vector product; they are what
the Hessian adds. The term, per family, written beside its backward:

* **bilinear** layers (Dense, the convolutions): ``backward_tangent`` — the weight gradient of
  the input's tangent and the input gradient through the weights' tangent
  (``d_w' = tᵀ d_y``, ``d_x' = d_y v_wᵀ`` for Dense; the same two convolutions for a convolution);
* **elementwise** activations with curvature (``second_derivative``): ``d_x' = f''(z) ⊙ t ⊙ d_y``;
  softmax and log-softmax write theirs (``_backward_tangent(res, t, d_y)``);
* **piecewise-linear parameter-free** layers (ReLU, pooling, shape layers, Dropout): zero;
* Embedding: zero (its backward does not depend on the table);
* the normalisations (LayerNorm, GroupNorm, BatchNorm with batch or running statistics):
  ``backward_tangent``, through ``x̂`` and ``1/σ`` and the scale's tangent;
* multi-head attention: ``backward_tangent``, its scores, softmax weights and heads
  differentiated once more along the tangent; the TransformerBlock: its parts' terms in turn
  (``second_order`` on each with ``R{d_y} = 0``); positional embeddings: zero;
* the recurrent cells (SimpleRNN, LSTM, GRU): ``backward_tangent``, the reverse scan
  differentiated along the per-step tangents of the forward scan (``tangent``);
* combinators (``Serial``, ``Residual``, ``Parallel``): ``second_order``, their children's in turn.

Layers without a term (cotangent maps, feedback alignment) are refused, naming the layer: their
GGN is still available (``fbp.curvature``). Checked against the dense autodiff Hessian of the
plain loss in ``fbp.check.curvature`` and ``tests/test_second_order.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.core import (
    InputError,
    Layer,
    Loss,
    ParameterFree,
    describe,
    path_name,
    run_forward,
    tree_mismatch,
    with_context,
)
from fbp.linear_pass import declares_rule, declares_tangent, has_tangent, tangent
from fbp.validation import typed_arguments
from fbp.walk import children


def _leaf_term(layer: Layer) -> str | None:
    """How a leaf gives its second-order term: ``"own"``, ``"elementwise"``, ``"zero"``, or ``None``."""
    if declares_rule(layer, ("backward_tangent",)):
        return "own"
    if declares_rule(layer, ("_backward_tangent",)):
        return "parameter-free"
    if isinstance(layer, ParameterFree):
        if callable(getattr(layer, "second_derivative", None)):
            return "elementwise"
        if layer.piecewise_linear:
            return "zero"
    return None


def unsupported(model: Layer, path: str = "") -> tuple[str, Layer] | None:
    """The first layer of ``model`` without the rules a Hessian-vector product needs, or ``None``.

    Args:
        model: a layer or model.
        path: its path (for the answer).

    Returns:
        ``(path, layer)`` of the first layer lacking a tangent rule or a second-order term.
    """
    kids = children(model)
    if kids:
        for name, child in kids.items():
            found = unsupported(child, f"{path}/{name}" if path else name)
            if found is not None:
                return found
        return None if declares_tangent(model) and declares_rule(model, ("second_order",)) else (path, model)
    return None if has_tangent(model) and _leaf_term(model) is not None else (path, model)


def require_like_params(params, v, caller: str) -> None:
    """Refuse a direction ``v`` that is not shaped like ``params`` or not floating where they are.

    Args:
        params: the params.
        v: the direction.
        caller: the public function, for the message.

    Raises:
        InputError: naming the first mismatch.
    """
    found = tree_mismatch(params, v)
    if found is not None:
        raise InputError(caller, f"the vector v must be shaped like params: {found[1]}. "
                                 f"Build it with jax.tree_util.tree_map(..., params)")
    for (path, p), u in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(v),
                            strict=True):
        if jnp.issubdtype(jnp.result_type(p), jnp.inexact) and not jnp.issubdtype(jnp.result_type(u), jnp.inexact):
            raise InputError(caller, f"the vector v must be floating like params; at '{path_name(path)}' received "
                                     f"{describe(u)}")


def second_order(layer: Layer, res, v, t, d_y, r_y):
    """One layer's (or combinator's) part of the R-backward.

    Args:
        layer: the layer (``unsupported(layer) is None``).
        res: its forward's residuals.
        v: its params' direction.
        t: its input's tangent (``None`` for zero).
        d_y: the gradient's cotangent at its output.
        r_y: ``R{d_y}`` at its output.

    Returns:
        ``(R{d_params}, d_x, r_x)``: its part of ``H v``, and the two cotangents at its input.
    """
    own = getattr(layer, "second_order", None)
    if children(layer):
        return own(res, v, t, d_y, r_y)
    _, d_x = layer.backward(res, d_y)
    r_params, r_x = layer.backward(res, r_y)
    kind = _leaf_term(layer)
    if t is None and kind != "own":
        return r_params, d_x, r_x
    if kind == "own":
        s_params, s_x = layer.backward_tangent(res, v, t, d_y)
        r_params = jax.tree_util.tree_map(jnp.add, r_params, s_params)
        r_x = r_x if s_x is None else jax.tree_util.tree_map(jnp.add, r_x, s_x)  # (d_x, None) with a mask
    elif kind == "elementwise":
        r_x = r_x + (layer.second_derivative(res) * t * d_y).astype(r_x.dtype)
    elif kind == "parameter-free":
        r_x = r_x + layer._backward_tangent(res, t, d_y).astype(r_x.dtype)
    return r_params, d_x, r_x


def loss_hessian_product(loss: Loss, pred, y, u):
    """``∇²_pred loss · u`` per example, from the loss's factor: ``S (Sᵀ u)``.

    Args:
        loss: the loss (its ``hessian_factor``).
        pred: the model's output.
        y: the targets.
        u: shaped like ``pred``.

    Returns:
        Shaped like ``pred``.
    """
    s = loss.hessian_factor(pred, y)
    if pred.ndim == 1:
        return s @ (s.T @ u)
    return jnp.einsum("n...m,nm->n...", s, jnp.einsum("n...m,n...->nm", s, u))


def hessian_product_of_pass(model: Layer, res, pred, loss: Loss, loss_res, y, v):
    """``H v`` on a forward's residuals.

    Args:
        model: the model (``unsupported(model) is None``).
        res: its forward's residuals.
        pred: its output.
        loss: the loss (its ``backward`` and ``hessian_factor``).
        loss_res: the loss's residuals at ``pred``.
        y: the targets.
        v: the direction, shaped like the params.

    Returns:
        ``H v``, shaped like the params.
    """
    jv = tangent(model, res, v, None)
    jv = jnp.zeros_like(pred) if jv is None else jv.astype(pred.dtype)
    r_pred = loss_hessian_product(loss, pred, y, jv)
    d_pred = loss.backward(loss_res, jnp.ones((), pred.dtype))
    return second_order(model, res, v, None, d_pred, r_pred)[0]


def require(model: Layer, caller: str) -> None:
    """Refuse a model with a layer that has no second-order rule, naming it and what to use instead.

    Args:
        model: the model.
        caller: the public function, for the message.

    Raises:
        InputError: naming the first such layer and its path.
    """
    found = unsupported(model)
    if found is not None:
        path, layer = found
        raise InputError(repr(layer), f"{caller}: a Hessian-vector product needs, at every layer, a tangent rule and "
                                      f"a second-order term (fbp.second_order: Dense, convolutions, activations, "
                                      f"normalisations, pooling and shape layers, Dropout, Embedding, Serial, "
                                      f"Residual, Parallel); this layer has none. Use the GGN (curvature='ggn', "
                                      f"fbp.curvature.ggn_vector_product)", path=tuple(path.split("/")) if path else ())


@typed_arguments
def hessian_vector_product(model: Layer, loss: Loss, *, has_state: bool = False, train: bool = False) -> Callable:
    """``H v``, the Hessian of the reduced loss in the parameters times ``v``, from hand-written
    rules (module docstring) — ``fbp.curvature.ggn_vector_product``'s twin, with the
    second-order terms the GGN leaves out.

    Args:
        model: the network (its layers must have second-order rules: ``require``).
        loss: a ``fbp.losses`` loss with a Hessian factor.
        has_state: for models that keep state.
        train: run the model in training mode.

    Returns:
        ``f(params, x, y, v, *, key=None) -> H v``, ``v`` and the result shaped like ``params``.
        With ``has_state=True``: ``f(params, state, x, y, v, *, key=None)``.

    Raises:
        InputError: a layer without a second-order rule (named, with its path).
    """
    require(model, "fbp.curvature.hessian_vector_product")
    if not callable(getattr(loss, "hessian_factor", None)):
        raise InputError(repr(loss), "fbp.curvature.hessian_vector_product needs a loss with a Hessian factor "
                                     "(every fbp.losses loss has one)")

    def product(params, x, y, v, *, state=None, key=None):
        require_like_params(params, v, "fbp.curvature.hessian_vector_product")
        pred, res = run_forward(model, params, x, state=state, key=key, train=train)
        return hessian_product_of_pass(model, res, pred, loss, loss.forward(pred, y)[1], y, v)

    return with_context(model, has_state, "fbp.curvature.hessian_vector_product", product)
