"""Combinators: layers built from layers. A network is itself a layer.

* ``Serial(f_1, ..., f_n)``: composition (below).
* ``Residual(block, projection=None)``: ``y = x + block(x)`` (or ``projection(x) + block(x)``);
  ``d_x = d_y + block.backward(d_y)`` — the identity path carries the gradient unchanged.
* ``Parallel(f_1, ..., f_n)``: every branch sees ``x``; outputs concatenated on the last axis;
  ``d_x = Σ_i f_i.backward(d_y_i)`` with ``d_y`` split back into the branches' widths.

``Serial(f_1, ..., f_n)`` computes ``y = f_n(... f_1(x))``. Its backward is the chain rule
applied right to left — backpropagation::

    d_h_n = d_y
    d_params_k, d_h_{k-1} = f_k.backward(res_k, d_h_k)     for k = n, ..., 1
    d_x = d_h_0

Params and residuals are tuples with one entry per child, so ``params[2]["w"]`` is the
kernel of the third layer and its path in reports and errors is ``2/w``. Forward mode
(``tangent``, ``fbp.linear_pass``) runs the same compositions left to right.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, at_path, describe, run_forward
from fbp.linear_pass import add, tangent
from fbp.second_order import second_order

PyTree = Any


def split_key(key, n: int) -> list:
    """One key per child.

    Args:
        key: the combinator's key, or ``None``.
        n: the number of children.

    Returns:
        ``n`` keys split from ``key``, or ``n`` times ``None``.
    """
    return [None] * n if key is None else list(jax.random.split(key, n))


def child_states(layer, state, n: int) -> list:
    """Each child's part of a tuple-structured combinator's state.

    Args:
        layer: the combinator (for the message).
        state: its state, a tuple with one entry per child, or ``None``.
        n: the number of children.

    Returns:
        A list of ``n`` child states (all ``None`` when ``state`` is ``None``).

    Raises:
        InputError: ``state`` is not a tuple of length ``n``.
    """
    if state is None:
        return [None] * n
    if not isinstance(state, (tuple, list)) or len(state) != n:
        raise InputError(repr(layer), f"expects state as a tuple with one entry per child ({n}), received "
                                      f"{type(state).__name__}; make it with model.init_state(params)")
    return list(state)


class ChildContext(NamedTuple):
    """What a combinator hands one child: its name (its entry in the params), the layer, and its
    own params, state and key."""

    name: str
    layer: Layer
    params: PyTree
    state: PyTree
    key: jax.Array | None


class Combinator(Layer):
    """The base of layers built from layers (``Serial``, ``Residual``, ``Parallel``).

    A subclass lists its ``children()`` by the name of their entry in its params — ``"0"``,
    ``"1"``, ... for a tuple (``Serial``, ``Parallel``), ``"block"``, ``"projection"`` for a dict
    (``Residual``) — and says how its residuals hold the children's (``child_residuals``). The
    plumbing is written here once: each child gets its own params, its own part of the state and
    its own key (split once per child), state is initialised and advanced child by child, and
    ``has_state`` / ``needs_key`` ask the children.
    """

    contextual = True

    @property
    def has_state(self):
        return any(child.has_state for child in self.children().values())

    @property
    def needs_key(self):
        return any(child.needs_key for child in self.children().values())

    @property
    def _as_tuple(self) -> bool:
        """Params and state are a tuple with one entry per child (else a dict by name)."""
        return hasattr(self, "layers")

    def _pack(self, by_name: dict) -> PyTree:
        return tuple(by_name.values()) if self._as_tuple else by_name

    def _part(self, tree: PyTree, name: str) -> PyTree:
        return tree[int(name)] if self._as_tuple else tree[name]

    def child_residuals(self, res) -> dict:
        """The children's residuals by name, from this combinator's own residuals."""
        raise NotImplementedError

    def init_state(self, params):
        return self._pack({name: child.init_state(self._part(params, name))
                           for name, child in self.children().items()})

    def next_state(self, state, res):
        if state is None:
            return None
        kids = self.children()
        residuals = self.child_residuals(res)
        return self._pack({name: kids[name].next_state(self._part(state, name), residuals[name]) for name in kids})

    def contexts(self, params, state, key) -> list[ChildContext]:
        """Each child with its params, state and key; ``state`` is checked against the children."""
        kids = self.children()
        names = list(kids)
        if self._as_tuple:
            states = child_states(self, state, len(names))
        elif state is None:
            states = [None] * len(names)
        elif not hasattr(state, "keys") or set(state.keys()) != set(names):
            raise InputError(repr(self), f"expects state as a dict with keys {sorted(names)}; make it "
                                         f"with model.init_state(params)")
        else:
            states = [state[n] for n in names]
        keys = split_key(key, len(names))
        return [ChildContext(n, kids[n], self._part(params, n), s, k)
                for n, s, k in zip(names, states, keys, strict=True)]


@dataclasses.dataclass(frozen=True, init=False)
class Serial(Combinator):
    """Layers applied one after another; ``Serial(Dense(64), Tanh(), Dense(10))``.

    Its residuals are a tuple of the children's, in order.

    Args:
        *layers: the layers, first to last.
    """

    layers: tuple[Layer, ...]
    chain: ClassVar[bool] = True  # each child's output is the next one's input

    def __init__(self, *layers: Layer):
        for i, child in enumerate(layers):
            if not isinstance(child, Layer):
                raise TypeError(f"Serial: argument {i} must be an fbp Layer, got {type(child).__name__}: {child!r}")
        object.__setattr__(self, "layers", tuple(layers))

    def __repr__(self) -> str:
        return f"Serial({', '.join(map(repr, self.layers))})"

    def children(self):
        return {str(i): child for i, child in enumerate(self.layers)}

    def replace_children(self, kids):
        return _with_layers(self, kids)

    def child_residuals(self, res):
        return {str(i): r for i, r in enumerate(res)}

    def init(self, key, x):
        keys = jax.random.split(key, max(len(self.layers), 1))
        params = []
        for i, (child, child_key) in enumerate(zip(self.layers, keys, strict=False)):
            with at_path(i):
                p = child.init(child_key, x)
                # the next layer's input, shape only (evaluation mode, initial state)
                x = jax.eval_shape(lambda p_, x_, c=child: c.apply(p_, x_, state=c.init_state(p_)), p, x)
            params.append(p)
        return tuple(params)

    def forward(self, params, x, *, state=None, key=None, train=False):
        self._check_params(params)
        residuals = []
        for ctx in self.contexts(params, state, key):
            with at_path(ctx.name), jax.named_scope(_scope(ctx)):
                x, res = run_forward(ctx.layer, ctx.params, x, state=ctx.state, key=ctx.key, train=train)
            residuals.append(res)
        return x, tuple(residuals)

    def backward(self, res, d_y):
        d_params = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            with jax.named_scope(f"{i}:{type(self.layers[i]).__name__}.backward"):
                d_params[i], d_y = self.layers[i].backward(res[i], d_y)
        return tuple(d_params), d_y

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): the children's tangents, first to last."""
        for i, child in enumerate(self.layers):
            d_x = tangent(child, res[i], d_params[i], d_x)
        return d_x

    def second_order(self, res, v, t, d_y, r_y):
        """Second order (``fbp.second_order``): the children's input tangents first to last, then
        their R-backward last to first."""
        inputs = []
        for i, child in enumerate(self.layers):
            inputs.append(t)
            t = tangent(child, res[i], v[i], t)
        out = [None] * len(self.layers)
        for i in reversed(range(len(self.layers))):
            out[i], d_y, r_y = second_order(self.layers[i], res[i], v[i], inputs[i], d_y, r_y)
        return tuple(out), d_y, r_y

    def _check_params(self, params):
        _require_tuple(self, params, "layer")


def _scope(ctx: ChildContext) -> str:
    """The name a child's ops carry in profiles and XLA dumps: its path entry and its type."""
    return f"{ctx.name}:{type(ctx.layer).__name__}"


def _with_layers(layer, kids):
    """A copy of a tuple-of-children combinator (and of any subclass, its other fields kept)
    with ``layers`` replaced by ``kids`` (``{"0": ..., "1": ...}``)."""
    new = copy.copy(layer)
    object.__setattr__(new, "layers", tuple(kids[str(i)] for i in range(len(layer.layers))))
    return new


def _require_tuple(layer, params, entry: str) -> None:
    """Serial's and Parallel's params: a tuple with one entry per child (a list is refused: the
    gradients come back as a tuple, and an optimizer state made from a list would not match them)."""
    n, owner = len(layer.layers), type(layer).__name__  # the class name: a whole model's repr is long
    if isinstance(params, tuple) and len(params) == n:
        return
    if isinstance(params, list) and len(params) == n:
        raise InputError(owner, f"expects params as a tuple with one entry per {entry}, received a list; convert "
                                f"it with tuple(params) (the gradients are a tuple, and an optimizer state made from "
                                f"a list would not match them)")
    got = f"a {type(params).__name__} of {len(params)} entries" if isinstance(params, (tuple, list)) \
        else f"a {type(params).__name__}"
    raise InputError(owner, f"expects params as a tuple with one entry per {entry} ({n} entries), received {got}. "
                            f"Did you init a different model?")


class ResidualRes(NamedTuple):
    """A Residual's residuals: its children's, by name (``"block"``, and ``"projection"`` if any)."""

    children: dict


class ParallelRes(NamedTuple):
    """A Parallel's residuals: its branches' (a tuple) and each branch's output width (how
    ``d_y`` is split back)."""

    children: tuple
    widths: tuple


@dataclasses.dataclass(frozen=True)
class Residual(Combinator):
    """``y = x + block(x)``, or ``y = projection(x) + block(x)`` when the shapes differ
    (e.g. ``projection=Dense(width)`` or a 1×1 ``Conv2D``). Params
    ``{"block": ..., "projection": ...}`` (paths ``block/0/w``).

    Args:
        block: the residual branch.
        projection: the skip path's layer when ``block`` changes the shape (default: the identity).
    """

    block: Layer
    projection: Layer | None = None

    def children(self):
        return {"block": self.block} if self.projection is None else {"block": self.block,
                                                                      "projection": self.projection}

    def replace_children(self, kids):
        return dataclasses.replace(self, **kids)

    def child_residuals(self, res):
        return res.children

    def init(self, key, x):
        keys = split_key(key, 2)
        params = {}
        for (name, child), k in zip(self.children().items(), keys, strict=False):
            with at_path(name):
                params[name] = child.init(k, x)
        return params

    def forward(self, params, x, *, state=None, key=None, train=False):
        if not hasattr(params, "keys") or set(params.keys()) != set(self.children()):
            got = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
            raise InputError(repr(self), f"expects params as a dict with keys {sorted(self.children())}, received "
                                         f"{got}. Did you init a different model?")
        outs, residuals = {}, {}
        for ctx in self.contexts(params, state, key):
            with at_path(ctx.name), jax.named_scope(_scope(ctx)):
                outs[ctx.name], residuals[ctx.name] = run_forward(ctx.layer, ctx.params, x, state=ctx.state,
                                                                  key=ctx.key, train=train)
        skip = outs.get("projection", x)
        if skip.shape != outs["block"].shape:
            raise InputError(repr(self), f"the block maps x {describe(x)} to {describe(outs['block'])}; add a "
                                         f"projection (e.g. Residual(block, projection=Dense(...))) so shapes match")
        return skip + outs["block"], ResidualRes(residuals)

    def backward(self, res, d_y):
        residuals = res.children
        d_params = {}
        d_params["block"], d_x = self.block.backward(residuals["block"], d_y)
        if self.projection is None:
            return d_params, d_x + d_y
        d_params["projection"], d_skip = self.projection.backward(residuals["projection"], d_y)
        return d_params, d_x + d_skip

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): the block's tangent plus the skip path's."""
        residuals = res.children
        block = tangent(self.block, residuals["block"], d_params["block"], d_x)
        skip = d_x if self.projection is None else tangent(self.projection, residuals["projection"],
                                                           d_params["projection"], d_x)
        return add(block, skip)

    def second_order(self, res, v, t, d_y, r_y):
        """Second order (``fbp.second_order``): the block's and the skip path's, added."""
        residuals, out = res.children, {}
        out["block"], d_x, r_x = second_order(self.block, residuals["block"], v["block"], t, d_y, r_y)
        if self.projection is None:
            return out, d_x + d_y, r_x + r_y
        out["projection"], d_s, r_s = second_order(self.projection, residuals["projection"], v["projection"], t,
                                                   d_y, r_y)
        return out, d_x + d_s, r_x + r_s


@dataclasses.dataclass(frozen=True, init=False)
class Parallel(Combinator):
    """Branches applied to the same input, outputs concatenated along the last axis.

    Args:
        *layers: the branches; their outputs must agree on every axis but the last.
    """

    layers: tuple[Layer, ...]

    def __init__(self, *layers: Layer):
        Serial(*layers)  # same argument checks
        object.__setattr__(self, "layers", tuple(layers))

    def children(self):
        return {str(i): child for i, child in enumerate(self.layers)}

    def replace_children(self, kids):
        return _with_layers(self, kids)

    def child_residuals(self, res):
        return {str(i): r for i, r in enumerate(res.children)}

    def init(self, key, x):
        params = []
        for i, (child, k) in enumerate(zip(self.layers, split_key(key, len(self.layers)), strict=True)):
            with at_path(i):
                params.append(child.init(k, x))
        return tuple(params)

    def forward(self, params, x, *, state=None, key=None, train=False):
        _require_tuple(self, params, "branch")
        outs, residuals = [], []
        for ctx in self.contexts(params, state, key):
            with at_path(ctx.name), jax.named_scope(_scope(ctx)):
                y, r = run_forward(ctx.layer, ctx.params, x, state=ctx.state, key=ctx.key, train=train)
            outs.append(y)
            residuals.append(r)
        if len({y.shape[:-1] for y in outs}) > 1:
            raise InputError("Parallel", "branch outputs must agree on every axis but the last, got "
                                         + ", ".join(describe(y) for y in outs))
        return jnp.concatenate(outs, axis=-1), ParallelRes(tuple(residuals), tuple(y.shape[-1] for y in outs))

    def backward(self, res, d_y):
        residuals, widths = res
        d_params, d_x = [], None
        start = 0
        for child, r, w in zip(self.layers, residuals, widths, strict=True):
            dp, dx = child.backward(r, d_y[..., start:start + w])
            start += w
            d_params.append(dp)
            d_x = dx if d_x is None else d_x + dx
        return tuple(d_params), d_x

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): the branches' tangents, concatenated (a zero one as zeros)."""
        residuals, widths = res
        outs = [tangent(c, r, p, d_x) for c, r, p in zip(self.layers, residuals, d_params, strict=True)]
        known = next((o for o in outs if o is not None), None)
        if known is None:
            return None
        return jnp.concatenate([jnp.zeros((*known.shape[:-1], w), known.dtype) if o is None else o
                                for o, w in zip(outs, widths, strict=True)], axis=-1)

    def second_order(self, res, v, t, d_y, r_y):
        """Second order (``fbp.second_order``): every branch's on its slice of the cotangents, added."""
        residuals, widths = res
        out, d_x, r_x, start = [], None, None, 0
        for child, r, p, w in zip(self.layers, residuals, v, widths, strict=True):
            o, dx, rx = second_order(child, r, p, t, d_y[..., start:start + w], r_y[..., start:start + w])
            out, d_x, r_x, start = [*out, o], add(d_x, dx), add(r_x, rx), start + w
        return tuple(out), d_x, r_x
