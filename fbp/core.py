"""The contracts of fbp: layers, losses and the backward transform.

A **layer** is an immutable value of pure functions::

    params        = layer.init(key, x)        # x: example batch (only .shape/.dtype are read)
    y             = layer.apply(params, x)
    y, res        = layer.forward(params, x)  # res: the residuals the backward pass needs
    d_params, d_x = layer.backward(res, d_y)  # hand-written vector-Jacobian product

The backward mirrors ``jax.custom_vjp``: for ``y = f(params, x)`` and an output cotangent
``d_y`` it returns ``d_params = (∂y/∂params)ᵀ d_y`` and ``d_x = (∂y/∂x)ᵀ d_y``.

A **loss** maps ``(pred, target)`` to a scalar (by default the mean over the batch)::

    value         = loss(pred, target)
    value, res    = loss.forward(pred, target)
    d_pred        = loss.backward(res, g)      # g: cotangent of the value, usually 1.0

The **backward transform** composes those rules and nothing else — JAX's autodiff is never
called here (only ``fbp.check`` uses it, as the independent reference)::

    value, grads  = fbp.value_and_grad(model, loss)(params, x, y)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fbp.validation import (  # noqa: F401  (re-exported: fbp.core is where layers import them from)
    InputError,
    at_path,
    check_fields,
    check_params,
    describe,
    is_concrete,
    path_name,
    require_bool,
    require_floating,
    require_int,
    require_key,
    require_no_params,
    require_number,
    require_state,
    require_state_mode,
    tree_mismatch,
)
from fbp.walk import (  # noqa: F401  (re-exported: tools import them from fbp.core)
    check_gradient_structure,
    child_params,
    children,
    layer_at,
    leaf_layers,
    map_leaf_params,
    transform_layers,
)

PyTree = Any
Array = jax.Array


# --------------------------------------------------------------------------- layers
class Layer:
    """Base class of every layer. Subclasses are frozen dataclasses (hashable, immutable).

    Implement ``init``, ``forward`` and ``backward``; ``apply`` follows.
    Parameter-free layers return ``{}`` from ``init`` and ``{}`` as ``d_params``.

    **State and randomness** (BatchNorm's running statistics, Dropout's masks) are explicit.
    A layer that needs them sets ``contextual = True`` and takes keyword arguments::

        y, res = layer.forward(params, x, state=state, key=key, train=True)
        state  = layer.next_state(state, res)     # e.g. running averages from saved batch stats
        state0 = layer.init_state(params)         # {} for layers without state

    Combinators pass each child its own part of ``state`` and its own key (split once per
    child), and call a non-contextual child as plain ``forward(params, x)`` — so a stateless,
    deterministic layer or model never sees a state, a key or a mode.
    """

    contextual: ClassVar[bool] = False
    piecewise_linear: ClassVar[bool] = False
    """True when the output's second derivatives in the input and in each parameter entry vanish
    (Dense, convolutions, pooling, ReLU, shape layers): ``fbp.curvature.diag_hessian`` adds no
    term there. An elementwise activation with curvature defines ``second_derivative(res)``."""

    linear_in_params: ClassVar[bool] = False
    """True when the output is linear in the params, ``forward(a·p + c·q, x) = a·forward(p, x) +
    c·forward(q, x)`` (Dense, convolutions, Embedding): then an example's gradient projected onto
    a direction ``V`` is ``⟨d_y_b, forward(V, x)_b⟩`` — one forward of the layer
    (``fbp.probes.project``)."""

    chain: ClassVar[bool] = False
    """True for a combinator that applies its children one after another, each one's output the
    next one's input (``Serial``): ``fbp.curvature.diag_hessian`` backpropagates through it."""

    independent_examples: ClassVar[bool | None] = None
    """Declared by a leaf class beside its forward: example ``b``'s output (and the input
    cotangent its backward returns) depends on example ``b`` alone, in both modes. ``None``:
    undeclared, so per-example and private computations measure it once
    (``fbp.independence``). A subclass that replaces the forward must declare again."""

    def __post_init__(self):
        """Plain fields checked against their annotations (``check_fields``); a subclass with its
        own ``__post_init__`` calls ``check_fields(self)`` first."""
        if dataclasses.is_dataclass(self):
            check_fields(self)

    def examples_independent(self, train: bool) -> bool | None:
        """Whether this layer keeps the examples of a batch apart in this mode (default: the
        class's ``independent_examples``); override where it depends on the mode.

        Args:
            train: training mode.

        Returns:
            ``True``, ``False``, or ``None`` for undeclared.
        """
        return self.independent_examples

    @property
    def has_state(self) -> bool:
        """Whether this layer (or a child) keeps state between steps."""
        return False

    @property
    def needs_key(self) -> bool:
        """Whether this layer (or a child) draws random numbers in training mode."""
        return False

    def children(self) -> dict[str, Layer]:
        """The layers this one is composed of, by their entry in its params; ``{}`` for a leaf layer."""
        return {}

    def replace_children(self, kids: dict[str, Layer]) -> Layer:
        """This layer with its children replaced by ``kids`` (same names). A combinator that
        defines ``children`` defines this too, so tools can rebuild a model around its leaves."""
        if kids:
            raise NotImplementedError(f"{type(self).__name__} lists children but does not implement replace_children")
        return self

    def init_state(self, params: PyTree) -> PyTree:
        """The initial state (``{}`` unless the layer keeps state)."""
        return {}

    def next_state(self, state: PyTree, res: PyTree) -> PyTree:
        """The state after a forward pass whose residuals are ``res`` (unchanged by default)."""
        return state

    def init(self, key: Array, x: Any) -> PyTree:
        """Parameters for inputs shaped like ``x`` (an array or ``jax.ShapeDtypeStruct``)."""
        raise NotImplementedError

    def forward(self, params: PyTree, x: Array) -> tuple[Array, PyTree]:
        """``(y, res)``: the output and the residuals saved for ``backward``."""
        raise NotImplementedError

    def backward(self, res: PyTree, d_y: Array) -> tuple[PyTree, Array]:
        """``(d_params, d_x)`` from the residuals and the output cotangent ``d_y``."""
        raise NotImplementedError

    def apply(self, params: PyTree, x: Array, *, state: PyTree = None, key: Array | None = None,
              train: bool = False) -> Array:
        """The output alone (evaluation mode unless ``train``). Under ``jax.jit`` the unused
        residuals cost nothing."""
        return run_forward(self, params, x, state=state, key=key, train=train)[0]

    def __call__(self, params: PyTree, x: Array, **context) -> Array:
        return self.apply(params, x, **context)


class Wrapper(Layer):
    """A layer around one other, ``self.layer`` (a field of the subclass), whose params, state and
    keys are the wrapped layer's and whose residuals hold the wrapped layer's first (``res[0]``).
    Telemetry's and per-example probes, quantised weights and the checker's references build on it."""

    contextual: ClassVar[bool] = True

    @property
    def has_state(self) -> bool:
        return self.layer.has_state

    @property
    def needs_key(self) -> bool:
        return self.layer.needs_key

    def init(self, key, x):
        return self.layer.init(key, x)

    def init_state(self, params):
        return self.layer.init_state(params)

    def next_state(self, state, res):
        return self.layer.next_state(state, res[0])


def run_forward(layer: Layer, params: PyTree, x: Array, *, state: PyTree = None, key: Array | None = None,
                train: bool = False) -> tuple[Array, PyTree]:
    """``layer.forward`` with the context passed only to layers that take it.

    Args:
        layer: the layer.
        params: its params.
        x: its input.
        state: its state (contextual layers only).
        key: a random key (contextual layers only).
        train: training mode (contextual layers only).

    Returns:
        ``(y, res)``: the output and the residuals its backward needs.
    """
    if layer.contextual:
        return layer.forward(params, x, state=state, key=key, train=train)
    return layer.forward(params, x)


NO_RESIDUAL = ()
"""The residual of a layer whose backward needs nothing (``Identity``, a hook, Dropout in evaluation):
the empty tuple, an empty pytree that costs nothing under ``jit``."""


class ParameterFree(Layer):
    """A layer without parameters: subclasses write ``_forward(x) -> (y, res)`` and
    ``_backward(res, d_y) -> d_x``; params and ``d_params`` are ``{}``. The input must be
    floating unless the subclass sets ``floating_only = False`` (shape layers such as Flatten)."""

    floating_only: ClassVar[bool] = True

    def init(self, key, x):
        if self.floating_only:
            require_floating(repr(self), x)
        return {}

    def forward(self, params, x):
        require_no_params(self, params)
        if self.floating_only:
            require_floating(repr(self), x)
        return self._forward(x)

    def backward(self, res, d_y):
        return {}, self._backward(res, d_y)


# --------------------------------------------------------------------------- losses
REDUCTIONS = ("mean", "sum", "none")


class Loss:
    """Base class of every loss. Subclasses are frozen dataclasses with a ``reduction`` field.

    ``reduction="mean"`` averages the per-example values over the batch (axis 0), ``"sum"``
    adds them, ``"none"`` returns them (then ``backward`` takes a ``g`` of shape ``(batch,)``).
    """

    reduction: str = "mean"

    def forward(self, pred: Array, target: Array) -> tuple[Array, PyTree]:
        raise NotImplementedError

    def backward(self, res: PyTree, g: Array | float = 1.0) -> Array:
        raise NotImplementedError

    def __call__(self, pred: Array, target: Array) -> Array:
        return self.forward(pred, target)[0]


# --------------------------------------------------------------------------- backward transform
def vjp(model: Layer, params: PyTree, x: Array, **context) -> tuple[Array, Callable[[Array], tuple[PyTree, Array]]]:
    """The forward pass and a pullback made of the hand-written rules.

    Args:
        model: any layer (a network is a layer).
        params: its parameters.
        x: an input batch.
        **context: ``state``, ``key``, ``train`` for contextual models (default: evaluation mode).

    Returns:
        ``(y, pullback)`` with ``pullback(d_y) -> (d_params, d_x)`` for ``y = model(params, x)``:
        ``d_params = (∂y/∂params)ᵀ d_y`` (the structure of ``params``) and ``d_x = (∂y/∂x)ᵀ d_y``.
        The pullback takes a ``d_y`` of ``y``'s shape and dtype; anything else raises
        ``InputError``.
    """
    y, res = run_forward(model, params, x, **context)

    def pullback(d_y):
        y_leaves, y_def = jax.tree_util.tree_flatten(y)
        d_leaves, d_def = jax.tree_util.tree_flatten(d_y)
        if y_def != d_def or any(getattr(d, "shape", None) != a.shape or getattr(d, "dtype", None) != a.dtype
                                 for a, d in zip(y_leaves, d_leaves, strict=True)):
            raise InputError(repr(model), f"the pullback needs d_y shaped like the output y "
                                          f"{jax.tree_util.tree_map(describe, y)}, received "
                                          f"{jax.tree_util.tree_map(describe, d_y)}")
        d_params, d_x = model.backward(res, d_y)
        check_gradient_structure(model, params, d_params)
        return d_params, d_x

    return y, pullback


def value_grad_and_output(model: Layer, loss: Loss, params: PyTree, x: Array, y: Array, *, state: PyTree = None,
                          key: Array | None = None, train: bool = True):
    """One forward pass, the loss, one backward pass.

    The building block of ``value_and_grad`` for callers that also need the prediction (metrics
    in a training step) or the model's state.

    Args:
        model: the model.
        loss: a loss with ``reduction="mean"`` or ``"sum"``.
        params: the params.
        x: the inputs.
        y: the targets.
        state: the model state, or ``None`` for a stateless model.
        key: a random key for layers that need one (Dropout).
        train: training mode (the default here).

    Returns:
        ``(value, grads, pred, new_state)``; ``new_state`` is ``None`` when ``state`` is ``None``.

    Raises:
        InputError: the loss does not reduce to a scalar, or the backward's ``d_params`` do not
            mirror ``params``.
    """
    if getattr(loss, "reduction", "mean") == "none":
        raise InputError(repr(loss), "the backward transform differentiates a scalar: use reduction='mean' (or "
                                     "'sum'); for per-example values and gradients, jax.vmap a mean-reduced loss")
    pred, res = run_forward(model, params, x, state=state, key=key, train=train)
    value, loss_res = loss.forward(pred, y)
    d_pred = loss.backward(loss_res, jnp.ones((), dtype=value.dtype))
    d_params, _ = model.backward(res, d_pred)  # d_x unused: XLA removes it under jit
    check_gradient_structure(model, params, d_params)  # trace time only: structure and shapes
    return value, d_params, pred, (None if state is None else model.next_state(state, res))


def value_and_grad(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """The backward transform: forward pass, loss, backward pass through every layer.

    For ``L(θ) = loss(model(θ, x), y)`` it runs ``pred, res = model.forward(θ, x)``, then
    ``d_pred = loss.backward(...)``, then ``∂L/∂θ, _ = model.backward(res, d_pred)`` — the chain
    rule applied layer by layer in reverse, by the hand-written rules only.

    Args:
        model: the network (a layer), in training mode.
        loss: a loss with ``reduction="mean"`` or ``"sum"`` (a scalar is differentiated).
        has_state: for models that keep state (BatchNorm): ``f`` then takes and returns it.

    Returns:
        ``f(params, x, y, *, key=None) -> (value, grads)``, equal to JAX's
        ``value_and_grad(lambda p: loss(model.apply(p, x, key=key, train=True), y))(params)``;
        ``grads`` has the structure of ``params``. With ``has_state=True``:
        ``f(params, state, x, y, *, key=None) -> (value, grads, new_state)``. ``f`` is pure:
        jit it, vmap it (per-example gradients) or run it inside ``lax.scan``. ``key`` is needed
        only by models with random layers (Dropout).

    Raises:
        InputError: for a model that keeps state without ``has_state=True`` (its new running
            statistics would be lost silently), or a loss with ``reduction="none"``.
    """
    def body(params, x, y, *, state=None, key=None):
        value, d_params, _, new_state = value_grad_and_output(model, loss, params, x, y, state=state, key=key)
        return (value, d_params, new_state) if has_state else (value, d_params)

    return with_context(model, has_state, "fbp.value_and_grad", body)


def with_context(model: Layer, has_state: bool, caller: str, body: Callable) -> Callable:
    """The one has-state adapter: give a body function the public signature of fbp's transforms.

    Every entry point that takes a model's state (``value_and_grad``, the engine, per-example
    and private gradients, curvature products, telemetry) is ``with_context`` around its body.

    Args:
        model: the model (checked against ``has_state``).
        has_state: the model keeps state.
        caller: the public function's name, for messages.
        body: ``body(params, x, y, *rest, state=None, key=None, **kwargs)``; further positional
            arguments (a direction ``v``) and keyword arguments (``mask``, ``noise_key``) pass through.

    Returns:
        ``f(params, x, y, *rest, **kwargs)``, or ``f(params, state, x, y, *rest, **kwargs)`` with
        ``has_state=True`` (which refuses ``state=None``).

    Raises:
        InputError: ``has_state=False`` for a stateful model.
    """
    require_state_mode(model, has_state, caller)
    if has_state:
        def with_state(params, state, x, y, *rest, key=None, **kwargs):
            require_state(model, state, caller)
            return body(params, x, y, *rest, state=state, key=key, **kwargs)

        return with_state

    def without_state(params, x, y, *rest, key=None, **kwargs):
        if "state" in kwargs:
            raise TypeError(f"{caller}: state= is for models that keep state; build it with has_state=True and "
                            f"call f(params, state, x, y)")
        return body(params, x, y, *rest, key=key, **kwargs)

    return without_state


def grad(model: Layer, loss: Loss, *, has_state: bool = False) -> Callable:
    """``value_and_grad`` without the value.

    Args:
        model: the network (a layer).
        loss: a mean- or sum-reduced loss.
        has_state: for models that keep state (BatchNorm).

    Returns:
        ``f(params, x, y, *, key=None) -> grads`` (the structure of ``params``), or
        ``f(params, state, x, y, *, key=None) -> (grads, new_state)`` with ``has_state=True``.
    """
    f = value_and_grad(model, loss, has_state=has_state)
    if has_state:
        return lambda *args, **kwargs: f(*args, **kwargs)[1:]
    return lambda *args, **kwargs: f(*args, **kwargs)[1]


def to_jax(model: Layer) -> Callable[[PyTree, Array], Array]:
    """An fbp model as a plain JAX function whose derivative is fbp's backward.

    Use it to drop an fbp model (including one with a replaced backward, such as feedback
    alignment) into code that differentiates with JAX's ``grad``.

    Args:
        model: any stateless, deterministic layer.

    Returns:
        ``f(params, x) = model.apply(params, x)``, with ``model.forward`` and ``model.backward``
        registered through ``jax.custom_vjp``.
    """

    @jax.custom_vjp
    def f(params, x):
        return model.apply(params, x)

    f.defvjp(lambda params, x: model.forward(params, x), model.backward)
    return f
