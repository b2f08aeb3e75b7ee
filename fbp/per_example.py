"""Per-example gradients, their norms and first-order statistics, from one backward pass.

The backward pass of a batch already holds, at every layer, the layer's input ``x`` and the
cotangent ``g = ∂L/∂y`` at its output, one row per example. Per-example quantities are built
from them where each layer's rule runs — no ``vmap(grad)`` over the whole model, no second pass:

* **Weights used like a Dense at many positions** (``fbp.nn.positions``): ``∇_W ℓ_b = X_bᵀ G_b``
  from the inputs ``X_b`` and product cotangents ``G_b`` at the ``T`` positions of example ``b``.
  At one position the norm is ``‖x_b‖ ‖g_b‖`` — without the gradient; otherwise the *ghost norm*
  ``Σ_{t,s} (x_bt·x_bs)(g_bt·g_bs)`` from two ``T×T`` Gram matrices (Li et al., 2022) when
  ``T² (n_in + n_out)`` is smaller than materialising ``T n_in n_out`` (mixed ghost clipping,
  Bu et al., 2023). Layers describe such weights by a ``per_example_positions(res, d_y)`` rule
  beside their backward: Dense (positions: the axes between batch and features),
  SimpleRNN/LSTM/GRU (time steps; ``[x_t, h_{t-1}]`` against the gate cotangents),
  MultiHeadAttention (tokens; four projections), TransformerBlock (its parts'), LayerNorm,
  GroupNorm and LearnedPositionalEmbedding (their per-example gradients directly). Ungrouped
  convolutions use output pixels as positions and the im2col windows one kernel tap at a time.
* **Embedding**: ``‖∇ ℓ_b‖² = Σ_{t,s} [id_bt = id_bs] (g_bt·g_bs)`` (ghost) or the scatter.
* **Every other layer** (grouped or transposed convolutions, a user's own): the layer's own
  rules run on each example alone — ``vmap`` over a batch-of-one forward and backward of *that
  layer only*, from its input and its output cotangent. A user's layer may instead define
  ``per_example_positions`` or ``per_example_grads(res, d_y)`` (``d_params`` with a leading
  batch axis).
* **A layer that mixes the examples of a batch** — BatchNorm in training mode (its statistics
  are the batch's), a user's ``x - x.mean(0)`` — has no per-example gradients: every leaf is
  checked before anything runs (declared by its class, or measured once: ``fbp.independence``)
  and one that mixes raises, naming its path.

Scaling: ``grads[b]`` is the gradient of the loss on example ``b`` alone (a batch of one), as
JAX's vmap of grad of the per-example loss; ``values`` are the per-example losses.

References:
    Goodfellow, "Efficient Per-Example Gradient Computations", 2015. Li, Tramèr, Liang &
    Hashimoto, "Large Language Models Can Be Strong Differentially Private Learners", ICLR 2022.
    Bu, Wang, Zha & Karypis, "Differentially Private Optimization on Large Model at Small Cost",
    ICML 2023. Dangel, Kunstner & Hennig, "BackPACK: Packing more into Backprop", ICLR 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fbp.core import (  # noqa: F401  (with_context re-exported: the engine and privacy import it from here)
    InputError,
    Layer,
    Loss,
    map_leaf_params,
    run_forward,
    with_context,
)
from fbp.extensions import Extension
from fbp.linear_pass import LinearPass
from fbp.nn.positions import sum_columns
from fbp.probes import MODES, probe_model, split_probed
from fbp.validation import typed_arguments

PyTree = Any


def _probed_forward(model, params, x, mode, hooks=(), check=True, **context):
    """The forward of ``model`` with every leaf probed: ``(probed, choices, pred, res)``."""
    choices: dict[str, Any] = {}
    probed = probe_model(model, mode, choices, hooks, check)
    slotted = map_leaf_params(model, params, lambda path, leaf, p: (p, None))
    return (probed, choices, *run_forward(probed, slotted, x, **context))


@typed_arguments
def run(model: Layer, loss: Loss, params, x, y, *, mode: str, state=None, key=None, train: bool = True,
        with_pred: bool = False):
    """One forward and one backward pass with per-example probes.

    Args:
        model: the model.
        loss: a loss with a ``reduction`` field (its per-example values come from ``"none"``).
        params: the params.
        x: the inputs, batch first.
        y: the targets.
        mode: ``"grads"``, ``"norms"``, ``"clip"``, ``"sgs"`` or a ``"kfac-…"`` mode (``MODES``); or a
            tuple of them, computed in the same pass (then ``per[path]`` is ``{mode: quantity}``).
        state: the model state, or ``None``.
        key: a random key for layers that need one.
        train: training mode.
        with_pred: also return the model's output.

    Returns:
        ``(values, grads, per, choices, new_state)`` (and ``pred`` with ``with_pred``):
        per-example losses ``(B,)``; the summed gradient ``Σ_b ∇ℓ_b``; ``per[path]`` for every
        leaf with parameters: per-example gradients (``"grads"``), squared norms (``"norms"``),
        what the clipped sum reads (``"clip"``: the squared norms with the layer's positions,
        materialised gradients or residuals) or ``Σ_b (∇ℓ_b)²`` (``"sgs"``); ``choices[path]``:
        how each was computed.

    Raises:
        ValueError: an unknown ``mode``.
        InputError: a loss without a ``reduction`` field.
    """
    if (mode not in MODES if isinstance(mode, str) else not mode or any(m not in MODES for m in mode)):
        raise ValueError(f"per_example.run: mode must be one of {MODES} (or a tuple of them), got {mode!r}")
    if not hasattr(loss, "reduction") or not dataclasses.is_dataclass(loss):
        raise InputError(repr(loss), "per-example quantities need a loss with a reduction field (its per-example "
                                     "values come from reduction='none')")
    each = dataclasses.replace(loss, reduction="none")
    probed, choices, pred, res = _probed_forward(model, params, x, mode, state=state, key=key, train=train)
    values, loss_res = each.forward(pred, y)
    d_pred = each.backward(loss_res, jnp.ones(values.shape, values.dtype))  # Σ_b of per-example losses
    grads, per = split_probed(model, probed.backward(res, d_pred)[0])
    new_state = None if state is None else probed.next_state(state, res)
    return (values, grads, per, choices, new_state) + ((pred,) if with_pred else ())


def one_pass(model: Layer, loss: Loss, params, x, y, *, modes: tuple, column_sets: tuple = (), hooks: tuple = (),
             check: bool = True, state=None, key=None, train: bool = True, exact: Layer | None = None):
    """The engine's pass: one probed forward, the backward of the per-example losses computing
    every quantity in ``modes``, and, on the same residuals, the column-vmapped backward of each
    entry of ``column_sets``.

    Args:
        model: the model.
        loss: a loss with a ``reduction`` field.
        params: the params.
        x: the inputs.
        y: the targets.
        modes: the quantities of the gradient's backward (``MODES``); may be empty.
        column_sets: ``(mode, columns)`` pairs: ``columns(pred) -> (*pred.shape, M)``, cotangent
            columns to backpropagate with the probes in ``mode`` (``"sgs"``: each layer's
            per-column squares, summed over the columns; a ``"kfac-…"`` mode: the per-column
            Kronecker blocks, with the column axis kept).
        hooks: extensions that read every leaf's output and cotangents (``fbp.probes.probe_model``).
        check: refuse a layer that mixes the examples of a batch.
        state: the model state, or ``None``.
        key: a random key for layers that need one.
        train: training mode.
        exact: the model's exact twin (``fbp.deviation.exact_model``), or ``None``: its backward
            runs on the same residuals, giving the exact gradient beside the rules' one.

    Returns:
        ``(values, summed, per, column_per, new_state, pred, exact_summed, back)``: per-example
        losses, ``Σ_b ∇ℓ_b``, ``per[path][mode]`` (and ``per[path]["layer"][hook name]``),
        ``column_per[i]`` = ``(found, layout)`` with ``found[path]`` the column set's quantity and
        ``layout[path]`` how each layer computed it, the new state, the model's output, the
        exact twin's ``Σ_b ∇ℓ_b`` (``None`` without ``exact``), and ``back: u ↦ Jᵀu``, the
        rules' backward of an output cotangent on the same residuals (linear in ``u``; a
        ``fbp.linear_pass.LinearPass``, whose ``tangent(v)`` is ``J v``).
    """
    if not isinstance(loss, Loss) or not hasattr(loss, "reduction") or not dataclasses.is_dataclass(loss):
        raise InputError(repr(loss), "per-example quantities need a loss with a reduction field")
    probed, _, pred, res = _probed_forward(model, params, x, tuple(modes), tuple(hooks), check, state=state,
                                           key=key, train=train)
    each = dataclasses.replace(loss, reduction="none")
    values, loss_res = each.forward(pred, y)
    d_pred = each.backward(loss_res, jnp.ones(values.shape, values.dtype))
    summed, per = split_probed(model, probed.backward(res, d_pred)[0])
    column_per = []
    for mode, columns in column_sets:
        layout: dict = {}
        on_columns = probe_model(model, "sgs-columns" if mode == "sgs" else mode, layout, check=False)  # the same
        found = jax.vmap(lambda c, probe=on_columns: split_probed(model, probe.backward(res, c)[0])[1],  # residuals
                         in_axes=-1)(columns(pred))
        if mode == "sgs":
            found = {path: sum_columns(q) for path, q in found.items()}
        column_per.append((found, layout))
    exact_summed = None
    if exact is not None:  # the same residuals, every leaf's exact VJP in place of its rule
        exact_summed = split_probed(model, probe_model(exact, (), {}, check=False).backward(res, d_pred)[0])[0]
    new_state = None if state is None else probed.next_state(state, res)
    back = LinearPass(model, res, pred, layer=probe_model(model, (), {}, check=False),
                      split=lambda d: split_probed(model, d)[0],
                      slot=lambda v: map_leaf_params(model, v, lambda path, leaf, p: (p, None)))
    return values, summed, per, column_per, new_state, pred, exact_summed, back


@typed_arguments
def backward_columns(model: Layer, params, x, columns: Callable, *, mode: str, gradient: Callable | None = None,
                     state=None, key=None, train: bool = True):
    """One forward pass, then the probed backward once for every column of ``columns(pred)``.

    The columns are the last axis of ``columns(pred)``, one output cotangent each, vmapped: the
    residuals are shared. ``fbp.curvature`` backpropagates a loss's Hessian factor this way.

    Args:
        model: the model.
        params: the params.
        x: the inputs.
        columns: ``pred -> (*pred.shape, M)``: the cotangents to backpropagate.
        mode: the probes' mode (``MODES``).
        gradient: optional ``pred -> d_pred``. Then ``grads`` is the gradient from one more
            backward of that cotangent, kept apart from the columns: XLA then drops the columns'
            own weight gradients, which nothing reads.
        state: the model state, or ``None``.
        key: a random key for layers that need one.
        train: training mode.

    Returns:
        ``(pred, grads, per, choices, new_state)``: ``grads`` and ``per[path]`` with a leading
        column axis (``per`` as in ``run`` for this ``mode``); ``grads`` without it when
        ``gradient`` is given.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in MODES:
        raise ValueError(f"per_example.backward_columns: mode must be one of {MODES}, got {mode!r}")
    probed, choices, pred, res = _probed_forward(model, params, x, mode, state=state, key=key, train=train)
    one = lambda column: split_probed(model, probed.backward(res, column)[0])  # noqa: E731
    grads, per = jax.vmap(one, in_axes=-1)(columns(pred))
    if gradient is not None:
        grads = one(gradient(pred))[0]
    new_state = None if state is None else probed.next_state(state, res)
    return pred, grads, per, choices, new_state


@typed_arguments
def grads(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """Per-example gradients from one backward pass of the batch.

    Args:
        model: the network (BatchNorm in training mode is refused: it mixes the batch).
        loss: the loss; each example's value is its loss on its own.
        has_state: for models that keep state.

    Returns:
        ``f(params, x, y, *, key=None) -> (values, grads)``: ``values`` the per-example losses
        ``(B,)``; every leaf of ``grads`` has a leading batch axis and ``grads[b]`` is the
        gradient of the loss on example ``b`` alone. With ``has_state=True``:
        ``f(params, state, x, y, ...)``.
    """

    def body(params, x, y, **context):
        values, _, per, _, _ = run(model, loss, params, x, y, mode="grads", **context)
        return values, _stacked(model, params, values, per)

    return with_context(model, has_state, "fbp.per_example.grads", body)


@typed_arguments
def grad_norms(model: Layer, loss: Loss, *, has_state: bool = False, per_layer: bool = False) -> Callable:
    """Per-example gradient norms ``‖g_b‖₂``, without materialising per-example gradients where a
    cheaper route exists (``‖x‖‖g‖`` at one position, the ghost norm; module docstring).

    Args:
        model: the network.
        loss: the loss.
        has_state: for models that keep state.
        per_layer: also return each leaf layer's norms.

    Returns:
        ``f(params, x, y, *, key=None) -> (values, norms)`` with ``norms`` of shape ``(B,)``, the
        L2 norm over all parameters of each example's gradient; with ``per_layer=True``,
        ``(values, norms, layer_norms)``, ``layer_norms[path]`` the ``(B,)`` norms of each leaf
        with parameters. ``routes`` says how each layer's norm is computed.
    """

    def body(params, x, y, **context):
        values, _, per, _, _ = run(model, loss, params, x, y, mode="norms", **context)
        norms = jnp.sqrt(sum(per.values(), jnp.zeros(values.shape, values.dtype)))
        if per_layer:
            return values, norms, {path: jnp.sqrt(sq) for path, sq in per.items()}
        return values, norms

    return with_context(model, has_state, "fbp.per_example.grad_norms", body)


def routes(model: Layer, loss: Loss, params, x, y, *, mode: str = "norms", **context) -> dict[str, str]:
    """How ``grad_norms`` (``mode="norms"``) or ``grads`` (``"grads"``) computes each leaf's
    per-example quantity for inputs shaped like ``x``: ``{"0": "norms ‖x‖‖g‖", "2": "ghost norm
    (T=64)", "3/block": "materialised (vmap of the layer's rules)", ...}``. Traces only (nothing runs).

    Args:
        model: the network.
        loss: the loss.
        params: its parameters (only shapes are read).
        x: an input batch (shapes only).
        y: the targets (shapes only).
        mode: ``"norms"`` or ``"grads"``.

    Returns:
        ``{path: route}`` for every leaf with parameters.
    """
    found: dict[str, str] = {}

    def trace(params, x, y):
        out = run(model, loss, params, x, y, mode=mode, **context)
        found.update(out[3])
        return out[0]

    jax.eval_shape(trace, params, x, y)
    return found


def _stacked(model, params, values, per):
    """``per`` (by leaf path) as a pytree shaped like params, with a leading batch axis."""
    def leaf(path, layer, p):
        if path in per:
            return per[path]
        return jax.tree_util.tree_map(lambda a: jnp.zeros((values.shape[0], *a.shape), a.dtype), p)

    return map_leaf_params(model, params, leaf)


@typed_arguments
def sum_grad_squared(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """``f(params, x, y, *, key=None) -> Σ_b (∇ℓ_b)²`` elementwise, shaped like params (BackPACK's
    SumGradSquared, for the per-example losses ``ℓ_b``). Each layer squares its own per-example
    gradients in the backward pass (a Dense on ``(B, n)`` as ``(x²)ᵀ(g²)``, never materialising
    them); no per-example gradient of the whole model ever exists.

    Args:
        model: the network.
        loss: the loss.
        has_state: for models that keep state.

    Returns:
        The function above.
    """

    def body(params, x, y, **context):
        return _sgs_and_sum(model, loss, params, x, y, **context)[0]

    return with_context(model, has_state, "fbp.per_example.sum_grad_squared", body)


@typed_arguments
def variance(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """``f(params, x, y, *, key=None) -> (1/B) Σ_b (∇ℓ_b - ḡ)²`` elementwise, ``ḡ`` the mean
    per-example gradient (BackPACK's Variance, for the per-example losses): ``SGS/B - ḡ²`` from
    the same pass (clamped at 0 against rounding).

    Args:
        model: the network.
        loss: the loss.
        has_state: for models that keep state.

    Returns:
        The function above.
    """

    def body(params, x, y, **context):
        sgs, total, b = _sgs_and_sum(model, loss, params, x, y, **context)
        return jax.tree_util.tree_map(lambda s, g: jnp.maximum(s / b - jnp.square(g / b), 0), sgs, total)

    return with_context(model, has_state, "fbp.per_example.variance", body)


def _sgs_and_sum(model, loss, params, x, y, **context):
    values, total, per, _, _ = run(model, loss, params, x, y, mode="sgs", **context)

    def leaf(path, layer, p):
        return per[path] if path in per else jax.tree_util.tree_map(jnp.zeros_like, p)

    return map_leaf_params(model, params, leaf), total, values.shape[0]


# --------------------------------------------------------------------------- as extensions of the one pass
@dataclasses.dataclass(frozen=True)
class Grads(Extension):
    """Per-example gradients, ``q["grads"][path]``: the leaf's params with a leading batch axis,
    entry ``b`` the gradient of example ``b``'s own loss (BackPACK's BatchGrad, unscaled)."""

    name: ClassVar[str] = "grads"
    needs: ClassVar[str] = "grads"


@dataclasses.dataclass(frozen=True)
class GradNorms(Extension):
    """Per-example gradient norms per leaf, ``q["grad_norms"][path]`` of shape ``(B,)``, by the
    cheapest route each layer has (``‖x_b‖‖g_b‖``, the ghost norm; never the per-example
    gradient where avoidable). The whole model's norm is ``sqrt(Σ_path q[path]²)``."""

    name: ClassVar[str] = "grad_norms"
    needs: ClassVar[str] = "norms"

    def finalize(self, found, context):
        return {path: jnp.sqrt(sq) for path, sq in found.items()}


@dataclasses.dataclass(frozen=True)
class SumGradSquared(Extension):
    """``Σ_b (∇ℓ_b)²`` elementwise per leaf, shaped like the leaf's params (BackPACK's SumGradSquared)."""

    name: ClassVar[str] = "sum_grad_squared"
    needs: ClassVar[str] = "sgs"


@dataclasses.dataclass(frozen=True)
class Variance(Extension):
    """``(1/B) Σ_b (∇ℓ_b - ḡ)²`` elementwise per leaf, ``ḡ`` the mean per-example gradient
    (BackPACK's Variance): ``SGS/B - ḡ²`` from the same pass, clamped at 0 against rounding."""

    name: ClassVar[str] = "variance"
    needs: ClassVar[str] = "sgs"

    def finalize(self, found, context):
        b = context.batch
        return {path: jax.tree_util.tree_map(lambda s, g: jnp.maximum(s / b - jnp.square(g / b), 0), sgs,
                                             context.leaf_grads[path])
                for path, sgs in found.items()}
