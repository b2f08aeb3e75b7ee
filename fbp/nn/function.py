"""A layer from three plain functions: ``fbp.layer(forward, backward, init)``.

The quickest way to a layer of your own without writing a class; the result composes, jits,
checks and measures (its batch independence is measured, ``fbp.independence``) like a built-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fbp.core import Array, Layer, PyTree


def _no_params(key: Array, x: Any) -> PyTree:
    return {}


@dataclasses.dataclass(frozen=True)
class FunctionLayer(Layer):
    """A layer made from three plain functions; see ``layer``.

    Args:
        init_fn: ``init_fn(key, x) -> params``.
        forward_fn: ``forward_fn(params, x) -> (y, res)``.
        backward_fn: ``backward_fn(res, d_y) -> (d_params, d_x)``.
        name: how the layer prints in errors and check reports.
    """

    init_fn: Callable[[Array, Any], PyTree]
    forward_fn: Callable[[PyTree, Array], tuple[Array, PyTree]]
    backward_fn: Callable[[PyTree, Array], tuple[PyTree, Array]]
    name: str = "CustomLayer"

    def init(self, key, x):
        return self.init_fn(key, x)

    def forward(self, params, x):
        return self.forward_fn(params, x)

    def backward(self, res, d_y):
        return self.backward_fn(res, d_y)

    def __repr__(self) -> str:
        return f"{self.name}()"


def layer(forward: Callable, backward: Callable, init: Callable = _no_params, *, name: str = "CustomLayer") -> Layer:
    """Make a layer from a forward, a backward and (if it has parameters) an init.

    Args:
        forward: ``forward(params, x) -> (y, res)``, written in plain ``jax.numpy``.
        backward: ``backward(res, d_y) -> (d_params, d_x)``; ``d_params`` has the structure
            of ``params``.
        init: ``init(key, x) -> params``; defaults to a parameter-free layer (``{}``).
        name: shown in error messages and check reports.

    Returns:
        A ``FunctionLayer``.

    The result composes in ``nn.Serial``, runs under ``fbp.value_and_grad`` and ``jax.jit``,
    and is verified by ``fbp.check.layer`` exactly like a built-in layer.
    """
    return FunctionLayer(init, forward, backward, name)
