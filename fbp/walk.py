"""Walking a model by path: its children, its leaf layers, rebuilding it around them, and the
check that a backward's ``d_params`` mirror the params.

Paths are the ones errors and check reports use: ``"0"``, ``"2/w"``, ``"1/block/0"``. A
combinator lists its children by the name of their entry in its params (``children()``), so
every walk here is generic: nothing is special-cased per combinator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fbp.validation import InputError, tree_mismatch

if TYPE_CHECKING:
    from fbp.core import Layer

PyTree = Any


def children(layer: Layer) -> dict[str, Layer]:
    """A combinator's children by the name of their entry in its params (``{"0": ..., "1": ...}`` for
    ``Serial``/``Parallel``, ``{"block": ...}`` for ``Residual``); ``{}`` for a leaf layer."""
    own = getattr(layer, "children", None)
    return dict(own()) if callable(own) else {}


def leaf_layers(model: Layer, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Layer]]:
    """``(path, layer)`` for every leaf layer, in forward order; paths as in errors and check reports."""
    kids = children(model)
    if not kids:
        yield "/".join(prefix), model
    for name, child in kids.items():
        yield from leaf_layers(child, (*prefix, name))


def transform_layers(model: Layer, fn: Callable[[str, Layer], Layer | None], prefix: tuple[str, ...] = ()) -> Layer:
    """Rebuild ``model`` top-down: ``fn(path, layer)`` returns a replacement (which is kept as is,
    not walked further) or ``None`` (keep the layer, and rebuild its children the same way).

    This is how tools wrap or swap layers without the user rebuilding the model: telemetry probes
    every leaf, ``fbp.credit`` swaps Dense for its feedback-alignment twin at chosen paths.
    """
    replaced = fn("/".join(prefix), model)
    if replaced is not None:
        return replaced
    kids = children(model)
    if not kids:
        return model
    new = {name: transform_layers(child, fn, (*prefix, name)) for name, child in kids.items()}
    try:
        return model.replace_children(new)
    except NotImplementedError:
        raise InputError(repr(model), f"{type(model).__name__} lists children() but has no replace_children(kids), "
                                      f"so tools that wrap its layers (telemetry, fbp.credit) cannot rebuild it; "
                                      f"add replace_children returning a copy with the children {sorted(kids)} "
                                      f"replaced", path=prefix) from None


def child_params(params: PyTree, name: str) -> PyTree:
    """A child's entry in its combinator's params: ``params[int(name)]`` for a tuple, else ``params[name]``."""
    return params[int(name)] if isinstance(params, (tuple, list)) else params[name]


def map_leaf_params(model: Layer, params: PyTree, fn: Callable[[str, Layer, PyTree], PyTree],
                    prefix: tuple[str, ...] = ()) -> PyTree:
    """``params`` with every leaf layer's entry replaced by ``fn(path, leaf, leaf_params)``; the
    combinators' containers (tuples, dicts) are kept."""
    kids = children(model)
    if not kids:
        return fn("/".join(prefix), model, params)
    new = {name: map_leaf_params(child, child_params(params, name), fn, (*prefix, name))
           for name, child in kids.items()}
    return tuple(new[str(i)] for i in range(len(new))) if isinstance(params, (tuple, list)) else new


def layer_at(model: Layer, parts: Sequence[str]) -> tuple[Layer, tuple[str, ...]]:
    """The deepest layer on ``parts`` (a parameter path) and the path to it."""
    node, taken = model, []
    for part in parts:
        kids = children(node)
        if part not in kids:
            break
        node = kids[part]
        taken.append(part)
    return node, tuple(taken)


def check_gradient_structure(model: Layer, params: PyTree, d_params: PyTree) -> None:
    """Raise ``InputError`` naming the layer and path where ``d_params`` (from the backward
    rules) does not mirror ``params``: a missing or extra entry, another container, another shape.

    It compares tree structures and shapes only, so under ``jit`` it runs once, at trace time.
    """
    problem = tree_mismatch(params, d_params)
    if problem is None:
        return
    first, detail = problem
    owner, at = layer_at(model, first.split("/") if first else ())
    raise InputError(repr(owner), f"the backward returned d_params that do not mirror the params ({detail}). "
                                  f"d_params must have exactly the structure and shapes of params (use {{}} for a "
                                  f"parameter-free layer)", path=at)
