"""Alternative credit assignment: backward rules that are *not* the gradient, by design.

Each is a layer that wraps existing ones, applied to a built model in one call, and keeps the
forward pass exactly as it was. Only where credit travels changes::

    backpropagation        d_x = d_y Wᵀ                       (the layer's exact rule)
    feedback alignment     d_x = d_y Bᵀ,  B fixed random       Lillicrap et al., 2016
    sign symmetry (uSF)    d_x = d_y Bᵀ,  B = sign(W)·rms(W)   Liao, Leibo & Poggio, 2016
    direct feedback        d_{h_l} = e B_l  for every hidden   Nøkland, 2016
      alignment (DFA)      representation h_l; e = ∂L/∂y the cotangent at the network's output

In every case a layer's *own* parameter gradient is its exact rule given the cotangent that
reaches its output (``d_w = xᵀ d_y`` for Dense), so what an optimizer does with it is unchanged.
Straight-through estimators live in ``fbp.nn.quantize``, cotangent hooks in ``fbp.nn.hooks``.

**Where B lives.** Fixed feedback matrices are part of the model's *state* (``init_state``
draws them from the wrapper's ``seed``), never of its params: no optimizer — decoupled weight
decay included — can touch them, and a checkpoint that saves the state saves them. Train with
``has_state=True`` (``fit`` does this by itself). Sign symmetry needs no state: ``B`` is read
from the current ``W``.

Every layer here follows ``fbp.deviation``'s protocol (``deviation``, ``reference_apply``,
``exact_backward``), so ``fbp.check`` verifies it against its own equation and
``fbp.telemetry`` measures its angle to the true gradient.

References:
    Lillicrap, Cownden, Tweed & Akerman, "Random synaptic feedback weights support error
    backpropagation for deep learning", Nature Communications 7, 2016.
    Liao, Leibo & Poggio, "How Important is Weight Symmetry in Backpropagation?", AAAI 2016.
    Nøkland, "Direct Feedback Alignment Provides Learning in Deep Neural Networks", NeurIPS 2016.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import ClassVar

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, describe, leaf_layers, require_int, run_forward, transform_layers
from fbp.deviation import surrogate_apply
from fbp.nn.combinators import Serial
from fbp.nn.init import draw_by_length
from fbp.validation import check_fields, typed_arguments

_sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------- feedback alignment
def _feedback_surrogate(layer: Layer, params, x, kernel):
    """Value ``layer(params, x)``; JAX gradient: the exact one for the params, ``d_y kernelᵀ`` for x."""
    through_b = run_forward(layer, {**_sg(params), "w": _sg(kernel)}, x)[0]
    return run_forward(layer, params, _sg(x))[0] + (through_b - _sg(through_b))


def _draw(layer: Layer, seed: int, index: int, shape, dtype):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    init = getattr(layer, "kernel_init", None)
    if init is not None:
        return init(key, tuple(shape), dtype)
    return draw_by_length(jax.random.normal, key, shape, dtype) / math.sqrt(shape[0])


class _KernelFeedback(Layer):
    """Shared by the feedback-alignment family: wraps a layer with ``swap_kernel`` (Dense, Conv);
    params, paths and forward are the wrapped layer's; ``d_x`` goes through ``_feedback``."""

    layer: Layer

    def _require_kernel_layer(self):
        if not callable(getattr(self.layer, "swap_kernel", None)):
            raise InputError(repr(self.layer), f"{type(self).__name__} needs a layer whose backward sends d_x through "
                                               f"a kernel (Dense, Conv1D, Conv2D, ConvTranspose2D, or a layer with "
                                               f"swap_kernel(res, kernel) and params['w'])")

    def init(self, key, x):
        return self.layer.init(key, x)

    def backward(self, res, d_y):
        inner, kernel = res
        d_params, _ = self.layer.backward(inner, d_y)  # the exact weight gradient
        w, swapped = self.layer.swap_kernel(inner, None)
        _, swapped = self.layer.swap_kernel(inner, self._feedback(w, kernel).astype(w.dtype))
        _, d_x = self.layer.backward(swapped, d_y)  # under jit XLA keeps one d_w and one d_x
        return d_params, d_x

    def exact_backward(self, res, d_y):
        return self.layer.backward(res[0], d_y)


@dataclasses.dataclass(frozen=True)
class FeedbackAlignment(_KernelFeedback):
    """``layer`` with ``d_x = d_y Bᵀ`` through a fixed random ``B`` of the kernel's shape.

    Lillicrap et al. (2016). ``d_w``, ``d_b`` are the exact rule's. ``B`` is the state
    ``{"feedback": B}``, drawn by ``init_state`` with ``layer.kernel_init`` from ``(seed, index)``.

    Args:
        layer: the Dense (or kernel layer) whose input cotangent is replaced.
        seed: the seed ``B`` is drawn from.
        index: folded into the seed, so each swapped layer of a model draws its own ``B``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    layer: Layer
    seed: int = 0
    index: int = 0
    contextual = True
    deviation: ClassVar[str] = "feedback alignment: d_x = d_y B^T through a fixed random B (in the state)"

    def __post_init__(self):
        check_fields(self)
        self._require_kernel_layer()

    def __repr__(self) -> str:
        return f"FeedbackAlignment({self.layer!r})"

    @property
    def has_state(self):
        return True

    def init_state(self, params):
        w = params["w"]
        return {"feedback": _draw(self.layer, self.seed, self.index, w.shape, w.dtype)}

    def _kernel_from(self, params, state):
        if not hasattr(state, "keys") or "feedback" not in state:
            raise InputError(repr(self), f"keeps its fixed feedback matrix in the model state: pass "
                                         f"state=model.init_state(params) (value_and_grad/make_step with "
                                         f"has_state=True; fit does it by itself), received {describe(state)}")
        b, w = state["feedback"], params["w"]
        if getattr(b, "shape", None) != w.shape:
            raise InputError(repr(self), f"the feedback matrix in the state is {describe(b)} but the kernel is "
                                         f"{describe(w)}; make the state with model.init_state(params)")
        return b

    def forward(self, params, x, *, state=None, key=None, train=False):
        kernel = self._kernel_from(params, state)
        y, res = self.layer.forward(params, x)
        return y, (res, kernel)

    def _feedback(self, w, kernel):
        return kernel

    def reference_apply(self, params, x, *, state=None, **context):
        return _feedback_surrogate(self.layer, params, x, self._kernel_from(params, state))


def sign_feedback(w):
    """uSF's feedback matrix: ``B = sign(W) · rms(W)``, so ``‖B‖_F = ‖W‖_F`` when no entry is 0.

    Args:
        w: the forward weight matrix.

    Returns:
        ``B`` with ``w``'s shape.
    """
    return jnp.sign(w) * jnp.sqrt(jnp.mean(jnp.square(w)))


@dataclasses.dataclass(frozen=True)
class SignSymmetry(_KernelFeedback):
    """``layer`` with ``d_x = d_y Bᵀ``, ``B = sign(W)·rms(W)`` from the current kernel.

    Uniform sign-concordant feedback, "uSF" (Liao, Leibo & Poggio, 2016). No state: ``B`` follows ``W``.

    Args:
        layer: the Dense (or kernel layer) whose input cotangent is replaced.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    layer: Layer
    deviation: ClassVar[str] = "sign symmetry: d_x = d_y B^T with B = sign(W) * rms(W)"

    def __post_init__(self):
        check_fields(self)
        self._require_kernel_layer()

    def __repr__(self) -> str:
        return f"SignSymmetry({self.layer!r})"

    def forward(self, params, x):
        y, res = self.layer.forward(params, x)
        return y, (res, None)

    def _feedback(self, w, kernel):
        return sign_feedback(w)

    def reference_apply(self, params, x, **context):
        return _feedback_surrogate(self.layer, params, x, sign_feedback(params["w"]))


def _wrap_kernels(model: Layer, paths: Iterable[str] | None, wrap, what: str) -> Layer:
    """Wrap the kernel layers at ``paths`` (default: every leaf layer with ``swap_kernel``)."""
    leaves = dict(leaf_layers(model))
    supported = [p for p, leaf in leaves.items() if callable(getattr(leaf, "swap_kernel", None))]
    if paths is None:
        chosen = supported
    else:
        chosen = [str(p) for p in ([paths] if isinstance(paths, (str, int)) else paths)]
        for p in chosen:
            if p not in leaves:
                raise InputError(repr(model), f"{what}: no leaf layer at path {p!r}; the leaf layers are "
                                              f"{list(leaves)}", path=tuple(p.split("/")))
            if p not in supported:
                raise InputError(repr(leaves[p]), f"{what} applies to layers whose backward sends d_x through a "
                                                  f"kernel (Dense, Conv1D, Conv2D, ConvTranspose2D); this layer has "
                                                  f"none. Kernel layers in this model: {supported}",
                                 path=tuple(p.split("/")))
    if not chosen:
        raise InputError(repr(model), f"{what}: the model has no Dense or convolution layer to apply it to")
    index = {p: i for i, p in enumerate(chosen)}
    return transform_layers(model, lambda path, layer: wrap(layer, index[path]) if path in index else None)


@typed_arguments
def feedback_alignment(model: Layer, *, paths: Iterable[str] | None = None, seed: int = 0) -> Layer:
    """``model`` with feedback alignment at ``paths`` (default: every Dense and convolution).

    Paths and params are unchanged (the same params train either model); the model now has state
    (the feedback matrices): ``state = new_model.init_state(params)``. ``seed`` draws them, one
    independent stream per wrapped layer.

    Args:
        model: the network.
        paths: the layers to change (default every Dense and convolution).
        seed: draws the fixed random feedback matrices.

    Returns:
        The model with feedback alignment at ``paths`` (it now has state: the feedback matrices).
    """
    require_int("feedback_alignment", "seed", seed, low=0)
    return _wrap_kernels(model, paths, lambda layer, i: FeedbackAlignment(layer, seed=seed, index=i),
                         "feedback_alignment")


def sign_symmetry(model: Layer, *, paths: Iterable[str] | None = None) -> Layer:
    """``model`` with sign-symmetric feedback (uSF) at ``paths`` (default: every Dense and convolution).

    Args:
        model: the network.
        paths: the layers to change (default every Dense and convolution).

    Returns:
        The model with sign-symmetric feedback at ``paths``.
    """
    return _wrap_kernels(model, paths, lambda layer, i: SignSymmetry(layer), "sign_symmetry")


# --------------------------------------------------------------------------- direct feedback alignment
@dataclasses.dataclass(frozen=True, init=False)
class DirectFeedbackAlignment(Serial):
    """A ``Serial`` trained by direct feedback alignment (Nøkland, 2016).

    Make it with ``direct_feedback_alignment``.

    Forward: the Serial's. Backward, with ``e = d_y`` flattened to ``(batch, out_size)``: the
    layers run their exact rules right to left, except that the cotangent leaving each target
    layer ``l`` (in ``targets``) for the layer below is replaced by ``e B_l``, reshaped to the
    layer's input — so every hidden representation ``h_l`` receives ``d_{h_l} = e B_l`` straight
    from the output error, and each layer's weight gradient is its exact rule from there
    (``d_{W_l} = h_lᵀ (f'(a_l) ⊙ e B_{l+1})`` for an MLP). State: ``{"layers": the Serial's,
    "feedback": {"l": B_l}}``, ``B_l`` of shape ``(out_size, size of layer l's input)``.

    Args:
        layers: the Serial's layers.
        targets: the indices of the layers whose input receives ``e B_l``.
        in_shapes: each target layer's input shape (without the batch axis).
        out_size: the size of the model's output per example.
        seed: the seed the feedback matrices are drawn from.
    """

    layers: tuple[Layer, ...]
    targets: tuple[int, ...]
    in_shapes: tuple[tuple[int, ...], ...]
    out_size: int
    seed: int = 0
    deviation: ClassVar[str] = "direct feedback alignment: each target layer's input receives e B_l"

    def __init__(self, layers, targets, in_shapes, out_size, seed=0):
        Serial.__init__(self, *layers)
        for name, value in (("targets", tuple(int(t) for t in targets)),
                            ("in_shapes", tuple(tuple(int(d) for d in s) for s in in_shapes)),
                            ("out_size", int(out_size)), ("seed", int(seed))):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"DirectFeedbackAlignment({Serial.__repr__(self)}, targets={self.targets})"

    @property
    def has_state(self):
        return True

    def init_state(self, params):
        feedback = {}
        for j, shape in zip(self.targets, self.in_shapes, strict=True):
            dtype = (jax.tree_util.tree_leaves(params[j]) or [jnp.zeros(())])[0].dtype
            key = jax.random.fold_in(jax.random.PRNGKey(self.seed), j)
            feedback[str(j)] = draw_by_length(jax.random.normal, key, (self.out_size, math.prod(shape)), dtype) \
                / math.sqrt(self.out_size)
        return {"layers": Serial.init_state(self, params), "feedback": feedback}

    def _split(self, state):
        if not hasattr(state, "keys") or set(state.keys()) != {"layers", "feedback"}:
            raise InputError("DirectFeedbackAlignment", f"keeps its feedback matrices in the model state: pass "
                                                        f"state=model.init_state(params) (has_state=True), received "
                                                        f"{describe(state)}")
        feedback = state["feedback"]
        wanted = {str(t): (self.out_size, math.prod(s)) for t, s in zip(self.targets, self.in_shapes, strict=True)}
        got = {k: tuple(getattr(v, "shape", ())) for k, v in feedback.items()} if hasattr(feedback, "items") else None
        if got != wanted:
            raise InputError("DirectFeedbackAlignment", f"expects feedback matrices {wanted} (target layer: shape) in "
                                                        f"state['feedback'], received {got}: the state of another "
                                                        f"model? Make it with this model's init_state(params)")
        return state["layers"], feedback

    def next_state(self, state, res):
        if state is None:
            return None
        layers, feedback = self._split(state)
        return {"layers": Serial.next_state(self, layers, res[0]), "feedback": feedback}

    def forward(self, params, x, *, state=None, key=None, train=False):
        layers, feedback = self._split(state)
        y, res = Serial.forward(self, params, x, state=layers, key=key, train=train)
        if y.ndim < 1 or math.prod(y.shape[1:]) != self.out_size:
            raise InputError("DirectFeedbackAlignment", f"was built for outputs of {self.out_size} values per "
                                                        f"example, the model returns {describe(y)}; rebuild it with "
                                                        f"direct_feedback_alignment(model, x)")
        return y, (res, feedback)

    def backward(self, res, d_y):
        residuals, feedback = res
        e = d_y.reshape(d_y.shape[0], -1)
        shapes = dict(zip(self.targets, self.in_shapes, strict=True))
        d_params = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            d_params[i], d_y = self.layers[i].backward(residuals[i], d_y)
            if i in shapes:  # the exact d_x is dropped (XLA removes it under jit)
                d_y = (e @ feedback[str(i)]).reshape((e.shape[0], *shapes[i])).astype(d_y.dtype)
        return tuple(d_params), d_y

    def exact_backward(self, res, d_y):
        return Serial.backward(self, res[0], d_y)

    def reference_apply(self, params, x, *, state=None, key=None, train=False):
        layers, feedback = self._split(state)
        h, taps = x, []
        for ctx in self.contexts(params, layers, key):
            if int(ctx.name) in self.targets:  # the gradient reaching h is e B_i, and nothing flows on through h
                flat = h.reshape(h.shape[0], -1) @ _sg(feedback[ctx.name]).T
                taps.append(flat - _sg(flat))
                h = _sg(h)
            h = surrogate_apply(ctx.layer, ctx.params, h, state=ctx.state, key=ctx.key, train=train)
        return h + sum(taps).reshape(h.shape) if taps else h


@typed_arguments
def direct_feedback_alignment(model: Serial, x, *, targets: Iterable[int] | None = None,
                              seed: int = 0) -> DirectFeedbackAlignment:
    """``model`` (a ``Serial``) trained by direct feedback alignment; ``x`` an example batch
    (array or ``jax.ShapeDtypeStruct``: only shapes are read).

    ``targets``: the top-level layers whose *input* receives ``e B_l``; default every layer with
    parameters except the first — the inputs of the 2nd, 3rd, ... Dense/Conv, i.e. every hidden
    representation. Params and paths are the Serial's; the state holds the ``B_l``.

    Args:
        model: a ``Serial``.
        x: an example batch (only shapes are read).
        targets: the top-level layers whose input receives ``e B_l`` (default above).
        seed: draws the ``B_l``.

    Returns:
        A ``DirectFeedbackAlignment`` layer (params and paths as ``model``'s; state holds the ``B_l``).
    """
    require_int("direct_feedback_alignment", "seed", seed, low=0)
    if not isinstance(model, Serial) or isinstance(model, DirectFeedbackAlignment):
        raise InputError(repr(model), "direct_feedback_alignment needs an nn.Serial (the output error is sent "
                                      "to the inputs of its top-level layers)")
    x = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    shapes, h = [], x
    for child, p in zip(model.layers, params, strict=True):
        shapes.append(tuple(h.shape))
        h = jax.eval_shape(lambda p_, x_, c=child: c.apply(p_, x_, state=c.init_state(p_)), p, h)
    with_params = [i for i, p in enumerate(params) if jax.tree_util.tree_leaves(p)]
    chosen = with_params[1:] if targets is None else [int(t) for t in targets]
    for t in chosen:
        if not 0 < t < len(model.layers):
            raise InputError(repr(model), f"direct_feedback_alignment: target {t} must name a top-level layer after "
                                          f"the first (1..{len(model.layers) - 1}); the input of layer 0 is the "
                                          f"model's input")
    if not chosen:
        raise InputError(repr(model), "direct_feedback_alignment: no hidden layer to send the error to (the model "
                                      "has fewer than two layers with parameters)")
    return DirectFeedbackAlignment(model.layers, sorted(set(chosen)), [shapes[t][1:] for t in sorted(set(chosen))],
                                   math.prod(h.shape[1:]), seed)
