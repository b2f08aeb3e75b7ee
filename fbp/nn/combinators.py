"""Combinators: layers built from layers. A network is itself a layer.

``Serial(f_1, ..., f_n)`` computes ``y = f_n(... f_1(x))``. Its backward is the chain rule
applied right to left — backpropagation::

    d_h_n = d_y
    d_params_k, d_h_{k-1} = f_k.backward(res_k, d_h_k)     for k = n, ..., 1
    d_x = d_h_0

Params and residuals are tuples with one entry per child, so ``params[2]["w"]`` is the
kernel of the third layer and its path in reports and errors is ``2/w``.
"""

from __future__ import annotations

import dataclasses

import jax

from fbp.core import InputError, Layer, at_path, run_forward


def split_key(key, n: int) -> list:
    """One key per child (``None`` for all when no key is given)."""
    return [None] * n if key is None else list(jax.random.split(key, n))


def child_states(layer, state, n: int) -> list:
    """Each child's part of a combinator's state (``None`` for all when no state is given)."""
    if state is None:
        return [None] * n
    if not isinstance(state, (tuple, list)) or len(state) != n:
        raise InputError(repr(layer), f"expects state as a tuple with one entry per child ({n}), received "
                                      f"{type(state).__name__}; make it with model.init_state(params)")
    return list(state)


@dataclasses.dataclass(frozen=True, init=False)
class Serial(Layer):
    """Layers applied one after another; ``Serial(Dense(64), Tanh(), Dense(10))``."""

    layers: tuple[Layer, ...]
    contextual = True

    def __init__(self, *layers: Layer):
        for i, child in enumerate(layers):
            if not isinstance(child, Layer):
                raise TypeError(f"Serial: argument {i} must be an fbp Layer, got {type(child).__name__}: {child!r}")
        object.__setattr__(self, "layers", tuple(layers))

    def __repr__(self) -> str:
        return f"Serial({', '.join(map(repr, self.layers))})"

    def init(self, key, x):
        keys = jax.random.split(key, max(len(self.layers), 1))
        params = []
        for i, (child, child_key) in enumerate(zip(self.layers, keys)):
            with at_path(i):
                p = child.init(child_key, x)
                x = jax.eval_shape(child.apply, p, x)  # the next layer's input: shape only
            params.append(p)
        return tuple(params)

    @property
    def has_state(self):
        return any(child.has_state for child in self.layers)

    @property
    def needs_key(self):
        return any(child.needs_key for child in self.layers)

    def init_state(self, params):
        return tuple(child.init_state(p) for child, p in zip(self.layers, params))

    def next_state(self, state, res):
        if state is None:
            return None
        return tuple(child.next_state(s, r) for child, s, r in zip(self.layers, state, res))

    def forward(self, params, x, *, state=None, key=None, train=False):
        self._check_params(params)
        n = len(self.layers)
        residuals = []
        for i, (child, p, s, k) in enumerate(zip(self.layers, params, child_states(self, state, n),
                                                 split_key(key, n))):
            with at_path(i):
                x, res = run_forward(child, p, x, state=s, key=k, train=train)
            residuals.append(res)
        return x, tuple(residuals)

    def backward(self, res, d_y):
        d_params = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            d_params[i], d_y = self.layers[i].backward(res[i], d_y)
        return tuple(d_params), d_y

    def _check_params(self, params):
        if not isinstance(params, (tuple, list)) or len(params) != len(self.layers):
            got = f"a {type(params).__name__} of {len(params)} entries" if isinstance(params, (tuple, list)) \
                else f"a {type(params).__name__}"
            raise InputError("Serial", f"expects params as a tuple with one entry per layer "
                                       f"({len(self.layers)} entries), received {got}. "
                                       f"Did you init a different model?")
