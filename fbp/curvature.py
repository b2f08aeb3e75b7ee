"""Curvature from the same backward pass: the diagonal of the generalised Gauss-Newton matrix
(exact and Monte-Carlo), GGN-vector products and K-FAC's Kronecker factors.

For a loss ``L(θ) = Σ_b ℓ(f(θ, x_b), y_b)`` (with the loss's reduction folded in) the GGN is

.. math::  G = \\sum_b J_b^\\top H_b J_b, \\qquad H_b = \\partial^2 L / \\partial f_b^2 = S_b S_b^\\top,

``J_b`` the Jacobian of the model's output for example ``b``. Each loss writes the factor
``S_b`` beside its forward and backward (``loss.hessian_factor``: the rows of
``√(diag(p) − ppᵀ)`` for softmax cross-entropy, ``√2 I`` scaled to the reduction for MSE) and a
sampled one with ``E[S Sᵀ] = H`` (``loss.sampled_hessian_factor``: targets drawn from the
model's predictive distribution). Backpropagating the columns ``s_bm`` of ``S`` through the
hand-written rules gives ``J_bᵀ s_bm`` at every layer, where the per-example machinery of
``fbp.per_example`` turns them into

* ``diag G = Σ_{b,m} (J_bᵀ s_bm)²`` — each layer squares its own per-example gradients (a
  Dense as ``(x²)ᵀ(g²)``; Dangel, Kunstner & Hennig, 2020);
* K-FAC's factors ``A ⊗ G`` for every weight used like a Dense (Dense, convolutions,
  SimpleRNN/LSTM/GRU, attention's projections; ``fbp.nn.positions.Positions.kronecker_factors``,
  with Eschenhagen et al.'s *expand* or *reduce* for weights shared over positions) and the
  exact diagonal for every other parameter (norm scales and biases, embeddings);

all in **one** forward and one (column-vmapped) backward pass. A layer that mixes the examples
of a batch (BatchNorm in training mode; a user's layer measured to mix: ``fbp.independence``)
raises, naming its path.

``ggn_vector_product`` needs ``J v``: the hand-written backward ``u ↦ Jᵀu`` is linear in
``u``, and JAX transposes it (``jax.linear_transpose``, the "double backward" trick of
PyTorch's R-op and BackPACK) — the forward is never differentiated.

References:
    Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature", ICML 2015. Botev, Ritter & Barber, "Practical Gauss-Newton Optimisation for
    Deep Learning", ICML 2017 (KFLR). Dangel, Kunstner & Hennig, "BackPACK: Packing more into
    Backprop", ICLR 2020. Eschenhagen, Immer, Turner, Schneider & Hennig, "Kronecker-Factored
    Approximate Curvature for Modern Neural Network Architectures", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, Loss, map_leaf_params, run_forward
from fbp.curvature_blocks import block_entries, block_matrix  # noqa: F401  (public here)
from fbp.extensions import Extension
from fbp.linear_pass import LinearPass, jacobian_vector_product
from fbp.nn.positions import assemble, sum_columns
from fbp.per_example import backward_columns, with_context
from fbp.second_order import hessian_vector_product, loss_hessian_product, require_like_params  # noqa: F401
from fbp.validation import check_fields, typed_arguments
from fbp.walk import child_params

PyTree = Any
APPROXIMATIONS = ("expand", "reduce")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["A", "G"], meta_fields=["kernels", "bias"])
@dataclasses.dataclass(frozen=True)
class KroneckerBlock:
    """One K-FAC block: the curvature of a layer's weights as ``≈ A ⊗ G``.

    The gradient of the kernels at ``kernels`` (rows stacked in order) and of the bias at ``bias``
    (a last row), seen as one matrix ``W: (fan_in [+1], n_out)``, has the curvature ``≈ A ⊗ G``.
    A pytree whose leaves are ``A`` and ``G`` (``kernels`` and ``bias`` are static).

    Attributes:
        kernels: ``((key, shape), ...)``: the kernel entries of the layer's params, in row order.
        bias: ``(key, shape)`` of the bias entry, or ``None``.
        A: ``(fan_in [+1], fan_in [+1])``: the input factor.
        G: ``(n_out, n_out)``: the output-cotangent factor.
    """

    kernels: tuple
    bias: tuple | None
    A: jax.Array
    G: jax.Array


class Factors(NamedTuple):
    """``kfac_factors``' result for one leaf layer: its Kronecker ``blocks`` and ``diagonal``,
    the exact GGN diagonal of every parameter no block covers (params-shaped, 0 elsewhere)."""

    blocks: list
    diagonal: PyTree


def _require_curvature(loss: Loss, caller: str) -> None:
    if not callable(getattr(loss, "hessian_factor", None)):
        raise InputError(repr(loss), f"{caller} needs the loss's Hessian factor: a loss with hessian_factor(pred, "
                                     f"target) and sampled_hessian_factor(pred, target, key, samples) (every "
                                     f"fbp.losses loss has them)")


def _keys(model: Layer, key, sampled: bool, caller: str):
    """``(model key, sampling key)`` from the one ``key`` argument."""
    if sampled and key is None:
        raise InputError(caller, "the Monte-Carlo estimate samples targets: pass key=jax.random.key(...)")
    if sampled and model.needs_key:
        return tuple(jax.random.split(key))
    return key, key


def _columns(loss: Loss, y, mc_samples: int | None, key):
    if mc_samples is None:
        return lambda pred: loss.hessian_factor(pred, y)
    return lambda pred: loss.sampled_hessian_factor(pred, y, key, mc_samples)


def _require_samples(mc_samples, caller: str) -> None:
    if mc_samples is not None and (not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1):
        raise ValueError(f"{caller}: mc_samples must be a positive int (or None for the exact factor), "
                         f"got {mc_samples!r}")


def _diagonal(model, loss, params, x, y, *, mc_samples, key, caller, **context):
    model_key, sample_key = _keys(model, key, mc_samples is not None, caller)
    _, _, per, _, _ = backward_columns(model, params, x, _columns(loss, y, mc_samples, sample_key),
                                       mode="sgs-columns", key=model_key, **context)

    def leaf(path, layer, p):
        if path in per:
            return sum_columns(per[path])
        return jax.tree_util.tree_map(jnp.zeros_like, p)

    return map_leaf_params(model, params, leaf)


@dataclasses.dataclass(frozen=True)
class DiagGGN(Extension):
    """The exact GGN diagonal as an extension, per leaf (``diag_ggn``'s quantity): the loss's
    Hessian-factor columns backpropagated, column-vmapped, on the same forward's residuals."""

    name: ClassVar[str] = "diag_ggn"
    needs: ClassVar[str] = "columns"
    column_key: ClassVar[str] = "diag_ggn"  # extensions with this key share one column pass

    def columns(self, loss, y, key):
        _require_curvature(loss, "fbp.curvature.DiagGGN")
        return _columns(loss, y, None, key)


@dataclasses.dataclass(frozen=True)
class DiagGGNMC(Extension):
    """A Monte-Carlo GGN diagonal as an extension, per leaf (``diag_ggn_mc``'s quantity); the
    call needs ``key``.

    Args:
        mc_samples: columns sampled per example.
    """

    mc_samples: int = 1
    name: ClassVar[str] = "diag_ggn_mc"
    needs: ClassVar[str] = "columns"
    samples: ClassVar[bool] = True

    def __post_init__(self):
        check_fields(self)
        _require_samples(self.mc_samples, "DiagGGNMC")

    @property
    def column_key(self):  # one column pass for every reader of this many samples
        return f"diag_ggn_mc{self.mc_samples}"

    def columns(self, loss, y, key):
        _require_curvature(loss, "fbp.curvature.DiagGGNMC")
        return _columns(loss, y, self.mc_samples, key)


@dataclasses.dataclass(frozen=True)
class KroneckerFactors(Extension):
    """K-FAC's factors as an extension, per leaf (``kfac_factors``' quantity, ``Factors``): the
    loss's Hessian-factor columns (exact: KFLR; or ``mc_samples`` sampled ones: K-FAC-MC, then
    the call needs ``key``) backpropagated, column-vmapped, on the same forward's residuals,
    each Dense-like weight's probe forming ``A`` and ``G`` (``Positions.kronecker_factors``).
    ``fbp.kfac``'s optimizer reads it through the training step.

    Args:
        mc_samples: sampled columns per example, or ``None`` for the exact factor.
        approximation: ``"expand"`` or ``"reduce"`` for weights shared over positions.
    """

    mc_samples: int | None = 1
    approximation: str = "expand"
    name: ClassVar[str] = "kronecker_factors"
    needs: ClassVar[str] = "columns"

    def __post_init__(self):
        check_fields(self)
        _require_samples(self.mc_samples, "KroneckerFactors")
        if self.approximation not in APPROXIMATIONS:
            raise ValueError(f"KroneckerFactors: approximation must be one of {APPROXIMATIONS}, "
                             f"got {self.approximation!r}")

    @property
    def samples(self):  # noqa: D401 - the engine asks for a key only when sampling
        return self.mc_samples is not None

    @property
    def column_mode(self):
        return f"kfac-{self.approximation}"

    def columns(self, loss, y, key):
        _require_curvature(loss, "fbp.curvature.KroneckerFactors")
        return _columns(loss, y, self.mc_samples, key)

    def finalize(self, found, context):
        return {path: _factors(context.model, context.params, path, got["out"], got["layout"])
                for path, got in found.items()}


@typed_arguments
def diag_ggn(model: Layer, loss: Loss, *, has_state: bool = False, train: bool = False) -> Callable:
    """The exact diagonal of the GGN, ``Σ_b Σ_m (J_bᵀ s_bm)²``, from one backward pass of the
    loss's Hessian-factor columns (``M`` columns: the outputs per example).

    Args:
        model: the network (BatchNorm in training mode is refused: it mixes the batch).
        loss: a ``fbp.losses`` loss (or one with ``hessian_factor``); its reduction scales ``G``.
        has_state: for models that keep state.
        train: run the model in training mode (Dropout masks from ``key``).

    Returns:
        ``f(params, x, y, *, key=None) -> diag``, shaped like ``params`` (0 for integer or
        absent parameters). With ``has_state=True``: ``f(params, state, x, y, *, key=None)``.
    """
    _require_curvature(loss, "fbp.curvature.diag_ggn")

    def body(params, x, y, **context):
        return _diagonal(model, loss, params, x, y, mc_samples=None, caller="fbp.curvature.diag_ggn",
                         train=train, **context)

    return with_context(model, has_state, "fbp.curvature.diag_ggn", body)


@typed_arguments
def diag_ggn_mc(model: Layer, loss: Loss, mc_samples: int = 1, *, has_state: bool = False,
                train: bool = False) -> Callable:
    """A Monte-Carlo estimate of the GGN diagonal: ``mc_samples`` sampled factor columns
    (targets drawn from the model's predictive distribution), unbiased, at the cost of
    ``mc_samples`` backward columns whatever the output size.

    Args:
        model: the network.
        loss: a ``fbp.losses`` loss.
        mc_samples: columns sampled per example.
        has_state: for models that keep state.
        train: run the model in training mode.

    Returns:
        ``f(params, x, y, *, key) -> diag`` shaped like ``params``; ``key`` is required.
    """
    _require_curvature(loss, "fbp.curvature.diag_ggn_mc")
    _require_samples(mc_samples, "fbp.curvature.diag_ggn_mc")

    def body(params, x, y, **context):
        return _diagonal(model, loss, params, x, y, mc_samples=mc_samples, caller="fbp.curvature.diag_ggn_mc",
                         train=train, **context)

    return with_context(model, has_state, "fbp.curvature.diag_ggn_mc", body)


@typed_arguments
def ggn_vector_product(model: Layer, loss: Loss, *, has_state: bool = False, train: bool = False) -> Callable:
    """``G v = Σ_b J_bᵀ H_b J_b v`` for conjugate-gradient / Hessian-free methods.

    ``J v`` comes from the layers' hand-written tangent rules (forward mode, ``fbp.linear_pass``),
    or, in a model with a layer that has none, from transposing the hand-written backward
    ``u ↦ Jᵀ u`` (``jax.linear_transpose``); ``H_b`` is applied as ``S_b (S_bᵀ u)`` from the
    loss's factor.

    Args:
        model: the network.
        loss: a ``fbp.losses`` loss.
        has_state: for models that keep state.
        train: run the model in training mode.

    Returns:
        ``f(params, x, y, v, *, key=None) -> G v``, ``v`` and the result shaped like ``params``.
        With ``has_state=True``: ``f(params, state, x, y, v, *, key=None)``.
    """
    _require_curvature(loss, "fbp.curvature.ggn_vector_product")

    def product(params, x, y, v, *, state=None, key=None):
        require_like_params(params, v, "fbp.curvature.ggn_vector_product")
        pred, res = run_forward(model, params, x, state=state, key=key, train=train)
        return ggn_product_of_pass(LinearPass(model, res, pred), pred, loss, y, v)

    return with_context(model, has_state, "fbp.curvature.ggn_vector_product", product)


def ggn_product_of_pass(back, pred, loss, y, v):
    """``Jᵀ H J v`` from a pass's linear backward ``back: u ↦ Jᵀu`` (``J v``: its tangent rules,
    ``fbp.linear_pass``, or its transpose).

    Args:
        back: the linear backward on the pass's residuals.
        pred: the model's output.
        loss: the loss (its ``hessian_factor``).
        y: the targets.
        v: the direction, shaped like the params.

    Returns:
        ``G v``, shaped like the params.
    """
    return back(loss_hessian_product(loss, pred, y, jacobian_vector_product(back, pred, v)))


@dataclasses.dataclass(frozen=True, eq=False)
class GGNVectorProduct(Extension):
    """``G v = Jᵀ H J v`` as an extension, per leaf (``ggn_vector_product``'s quantity), on the
    same forward's residuals: ``J v`` by transposing the pass's linear backward, ``H`` from the
    loss's factor, then one more backward. ``v`` is fixed when the extension is built — build it
    inside your jitted function when it changes from call to call.

    Args:
        v: the direction, shaped like the params.
    """

    v: Any = None
    name: ClassVar[str] = "ggn_vector_product"
    needs: ClassVar[str] = "backward"
    requires_independence: ClassVar[bool] = False  # the batch's GGN: no per-example quantity

    def from_pass(self, back, pred, loss, y, params):
        """``G v`` shaped like ``params`` from the pass's backward (``fbp.extensions``)."""
        _require_curvature(loss, "fbp.curvature.GGNVectorProduct")
        require_like_params(params, self.v, "fbp.curvature.ggn_vector_product")
        return ggn_product_of_pass(back, pred, loss, y, self.v)


@typed_arguments
def kfac_factors(model: Layer, loss: Loss, *, mc_samples: int | None = None, approximation: str = "expand",
                 has_state: bool = False, train: bool = False, with_grads: bool = False) -> Callable:
    """K-FAC's Kronecker factors for every Dense-like weight, and the exact GGN diagonal of
    every other parameter, from one backward pass.

    ``mc_samples=None`` backpropagates the exact factor (KFLR, Botev et al., 2017);
    an int samples that many columns (K-FAC's Monte-Carlo Fisher, Martens & Grosse, 2015).

    Args:
        model: the network.
        loss: a ``fbp.losses`` loss.
        mc_samples: ``None`` (exact, KFLR) or the number of sampled columns (K-FAC-MC).
        approximation: ``"expand"`` or ``"reduce"`` for weights shared over positions
            (``Positions.kronecker_factors``).
        has_state: for models that keep state.
        train: run the model in training mode.
        with_grads: also return the loss and its gradient (one more backward, of the loss's cotangent,
            over the same forward residuals; the columns' own weight gradients are never formed).

    Returns:
        ``f(params, x, y, *, key=None) -> {path: Factors}`` for every leaf with parameters
        (``key`` required when sampling); with ``with_grads=True``,
        ``(value, grads, factors)``.
    """
    _require_curvature(loss, "fbp.curvature.kfac_factors")
    _require_samples(mc_samples, "fbp.curvature.kfac_factors")
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"fbp.curvature.kfac_factors: approximation must be one of {APPROXIMATIONS}, "
                         f"got {approximation!r}")
    caller = "fbp.curvature.kfac_factors"

    def body(params, x, y, *, state=None, key=None):
        model_key, sample_key = _keys(model, key, mc_samples is not None, caller)
        factor = _columns(loss, y, mc_samples, sample_key)
        value = []

        def gradient(pred):
            v, loss_res = loss.forward(pred, y)
            value.append(v)
            return loss.backward(loss_res, 1.0)

        _, grads, per, layout, _ = backward_columns(model, params, x, factor, mode=f"kfac-{approximation}",
                                                    gradient=gradient if with_grads else None, state=state,
                                                    key=model_key, train=train)
        factors = {path: _factors(model, params, path, out, layout[path]) for path, out in per.items()}
        return (value[0], grads, factors) if with_grads else factors

    return with_context(model, has_state, caller, body)


def _factors(model, params, path, out, layout) -> Factors:
    """One leaf's ``Factors`` from its per-column results (``A`` is the same in every column)."""
    blocks = [KroneckerBlock(kernels, bias, a[0], g.sum(axis=0))
              for (kernels, bias), (a, g) in zip(layout, out["blocks"], strict=True)]
    sums = lambda t: jax.tree_util.tree_map(lambda v: v.sum(axis=0), t)  # noqa: E731
    if "tree" in out:
        return Factors(blocks, sums(out["tree"]))
    template = jax.tree_util.tree_map(jnp.zeros_like, _leaf_params(model, params, path))
    return Factors(blocks, assemble(template, sums(out["diagonal"])))


def _leaf_params(model, params, path):
    """The params of the leaf at ``path`` (``"1/0"``), by ``walk.child_params`` along it."""
    for part in path.split("/") if path else ():
        params = child_params(params, part)
    return params


from fbp.curvature_hessian import diag_hessian  # noqa: E402  (public here; it uses the helpers above)

__all__ = ["APPROXIMATIONS", "Factors", "KroneckerBlock", "block_entries", "block_matrix", "diag_ggn", "diag_ggn_mc",
           "diag_hessian", "ggn_vector_product", "kfac_factors"]
