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
    """A combinator's children by the name of their entry in its params.

    Args:
        layer: any layer.

    Returns:
        ``{"0": ..., "1": ...}`` for ``Serial``/``Parallel``, ``{"block": ...}`` for ``Residual``,
        ``{}`` for a leaf layer (one without a ``children()`` method).
    """
    own = getattr(layer, "children", None)
    return dict(own()) if callable(own) else {}


def leaf_layers(model: Layer, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Layer]]:
    """Every leaf layer of a model with its path, in forward order.

    Args:
        model: the model (a layer, usually a combinator).
        prefix: the path of ``model`` itself inside a larger model.

    Returns:
        An iterator of ``(path, layer)``; paths as in errors and check reports (``"1/block/0"``).
    """
    kids = children(model)
    if not kids:
        yield "/".join(prefix), model
    for name, child in kids.items():
        yield from leaf_layers(child, (*prefix, name))


def transform_layers(model: Layer, fn: Callable[[str, Layer], Layer | None], prefix: tuple[str, ...] = ()) -> Layer:
    """Rebuild ``model`` top-down, replacing the layers ``fn`` chooses.

    This is how tools wrap or swap layers without the user rebuilding the model: telemetry probes
    every leaf, ``fbp.credit`` swaps Dense for its feedback-alignment twin at chosen paths.

    Args:
        model: the model to rebuild.
        fn: ``fn(path, layer)`` returns a replacement (kept as it is, not walked further) or ``None``
            (keep the layer, and rebuild its children the same way).
        prefix: the path of ``model`` itself inside a larger model.

    Returns:
        The rebuilt model; ``model`` itself where nothing was replaced below it.

    Raises:
        InputError: a combinator lists ``children()`` but has no ``replace_children``.
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
    """A child's entry in its combinator's params.

    Args:
        params: the combinator's params (a tuple for ``Serial``/``Parallel``, a dict for ``Residual``).
        name: the child's name from ``children()``.

    Returns:
        ``params[int(name)]`` for a tuple or list, else ``params[name]``.
    """
    return params[int(name)] if isinstance(params, (tuple, list)) else params[name]


def map_leaf_params(model: Layer, params: PyTree, fn: Callable[[str, Layer, PyTree], PyTree],
                    prefix: tuple[str, ...] = ()) -> PyTree:
    """``params`` with every leaf layer's entry replaced by ``fn(path, leaf, leaf_params)``.

    The combinators' containers (tuples, dicts) are kept, so the result mirrors ``params``.

    Args:
        model: the model the params belong to.
        params: its params.
        fn: ``fn(path, leaf_layer, leaf_params) -> new leaf params``.
        prefix: the path of ``model`` itself inside a larger model.

    Returns:
        The new params pytree.
    """
    kids = children(model)
    if not kids:
        return fn("/".join(prefix), model, params)
    new = {name: map_leaf_params(child, child_params(params, name), fn, (*prefix, name))
           for name, child in kids.items()}
    return tuple(new[str(i)] for i in range(len(new))) if isinstance(params, (tuple, list)) else new


def layer_at(model: Layer, parts: Sequence[str]) -> tuple[Layer, tuple[str, ...]]:
    """The deepest layer on a parameter path.

    Args:
        model: the model.
        parts: a parameter path split at ``/`` (``["1", "block", "w"]``).

    Returns:
        ``(layer, path)``: the deepest layer the leading parts name, and the parts taken to reach it.
    """
    node, taken = model, []
    for part in parts:
        kids = children(node)
        if part not in kids:
            break
        node = kids[part]
        taken.append(part)
    return node, tuple(taken)


def check_gradient_structure(model: Layer, params: PyTree, d_params: PyTree) -> None:
    """Check that the backward rules' ``d_params`` mirror ``params``.

    It compares tree structures and shapes only, so under ``jit`` it runs once, at trace time.

    Args:
        model: the model whose backward produced ``d_params``.
        params: its params.
        d_params: the gradient pytree.

    Raises:
        InputError: naming the layer and path where an entry is missing or extra, the container
            differs, or a shape differs.
    """
    problem = tree_mismatch(params, d_params)
    if problem is None:
        return
    first, detail = problem
    owner, at = layer_at(model, first.split("/") if first else ())
    raise InputError(repr(owner), f"the backward returned d_params that do not mirror the params ({detail}). "
                                  f"d_params must have exactly the structure and shapes of params (use {{}} for a "
                                  f"parameter-free layer)", path=at)
