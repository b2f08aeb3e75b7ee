"""The deviation protocol: how a rule that is not the gradient *by design* tells the tools so.

A layer whose backward departs from the derivative of its forward on purpose — feedback
alignment (``fbp.credit``), a straight-through estimator (``fbp.nn.quantize``), a cotangent
hook (``fbp.nn.hooks``), or a user's own — declares:

* ``deviation`` (a class attribute): one line saying how the rule departs from the gradient;
* ``reference_apply(params, x, **context)``: a plain-JAX function with the layer's value whose
  JAX gradient *is* the rule, written from the rule's own equation (typically with
  ``stop_gradient``). ``fbp.check`` differentiates it as the independent reference, names the
  path as deviating by design, and skips finite differences (the rule is not a derivative);
* optionally ``exact_backward(res, d_y)``: the true VJP from the same residuals.
  ``fbp.telemetry`` runs it to measure each layer's angle between the rule and the gradient.
"""

from __future__ import annotations

import dataclasses

from fbp.core import Layer, Wrapper, children, run_forward, transform_layers


def deviates(layer: Layer) -> bool:
    """Whether ``layer``'s backward departs from the gradient by design.

    Args:
        layer: any layer.

    Returns:
        ``True`` if it declares a non-empty ``deviation``.
    """
    return bool(getattr(layer, "deviation", ""))


def deviations(model: Layer, prefix: tuple[str, ...] = ()) -> list[tuple[str, Layer]]:
    """Every layer in ``model`` whose rule deviates by design, outermost first.

    A deviating combinator is reported once, without walking into it.

    Args:
        model: the model.
        prefix: the path of ``model`` itself inside a larger model.

    Returns:
        A list of ``(path, layer)``.
    """
    if deviates(model):
        return [("/".join(prefix), model)]
    return [item for name, child in children(model).items() for item in deviations(child, (*prefix, name))]


def surrogate_apply(layer: Layer, params, x, **context):
    """``layer``'s output from plain JAX, the function ``fbp.check`` differentiates as its reference.

    Args:
        layer: the layer under check.
        params: its params.
        x: its input.
        **context: ``state``, ``key`` and ``train`` for contextual layers.

    Returns:
        ``layer.reference_apply(params, x, **context)`` if it deviates (so JAX's gradient is the
        rule), else its ``apply``.
    """
    if deviates(layer):
        return layer.reference_apply(params, x, **context)
    return layer.apply(params, x, **context) if layer.contextual else run_forward(layer, params, x)[0]


@dataclasses.dataclass(frozen=True)
class _Reference(Wrapper):
    """A deviating layer seen through its ``reference_apply`` (only ever differentiated by JAX)."""

    layer: Layer

    def forward(self, params, x, *, state=None, key=None, train=False):
        return self.layer.reference_apply(params, x, state=state, key=key, train=train), None


def reference_model(model: Layer) -> Layer:
    """``model`` with every deviating layer replaced by its ``reference_apply``.

    Only ever differentiated by JAX, in ``fbp.check``.

    Args:
        model: the model.

    Returns:
        The model whose JAX gradient is what its hand-written rules compute.
    """
    return transform_layers(model, lambda path, layer: _Reference(layer) if deviates(layer) else None)


@dataclasses.dataclass(frozen=True)
class _Exact(Wrapper):
    """A deviating layer with its forward kept and its backward replaced by the exact VJP."""

    layer: Layer

    def children(self):
        return children(self.layer)

    def replace_children(self, kids):
        return _Exact(self.layer.replace_children(kids))

    def forward(self, params, x, **context):
        return run_forward(self.layer, params, x, **context)

    def backward(self, res, d_y):
        return self.layer.exact_backward(res, d_y)

    def next_state(self, state, res):
        return self.layer.next_state(state, res)


def exact_model(model: Layer) -> Layer | None:
    """``model`` with every deviating layer's backward replaced by its exact VJP.

    Same forward, same residuals, so it can run backward on the residuals of ``model``'s forward
    (telemetry's alignment angles).

    Args:
        model: the model.

    Returns:
        The rebuilt model, or ``None`` if no layer deviates or a deviating layer has no
        ``exact_backward`` (a quantiser: its true derivative is zero).
    """
    found = deviations(model)
    if not found or not all(hasattr(layer, "exact_backward") for _, layer in found):
        return None
    return transform_layers(model, lambda path, layer: _Exact(layer) if deviates(layer) else None)
