"""A flat view of some of a model's parameters: the coordinates that a spectrum, a Laplace
posterior or an influence score lives on (every parameter, or the layers a user names).

``Subspace.restrict`` takes a params-shaped tree to the flat vector of the chosen coordinates
(``jax.flatten_util.ravel_pytree``'s order, the chosen ones kept); ``Subspace.embed`` is its
transpose: a flat vector back into a params-shaped tree with zeros elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fbp.core import InputError, Layer
from fbp.walk import map_leaf_params

PyTree = Any


def leaf_paths(model: Layer, params) -> list[str]:
    """The leaf layers that hold floating parameters.

    Args:
        model: the model.
        params: its params.

    Returns:
        Their paths (``"0"``, ``"block/attention"``), in the model's order.
    """
    found = []

    def leaf(path, layer, p):
        if any(jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in jax.tree_util.tree_leaves(p)):
            found.append(path)
        return p

    map_leaf_params(model, params, leaf)
    return found


@dataclasses.dataclass(frozen=True, eq=False)
class Subspace:
    """The coordinates of ``layers`` (leaf paths, or a path's whole sub-model) in the flat params.

    Attributes:
        indices: ``(dim,)`` numpy indices into the flat params.
        size: the flat params' length.
        unravel: flat params → params tree.
        groups: ``{path: (start, stop)}``: each chosen leaf layer's slice of the subspace.
        signature: the params' tree structure, shapes and dtypes (with the rest, what makes two
            subspaces equal).
    """

    indices: np.ndarray
    size: int
    unravel: Any
    groups: dict
    signature: tuple = ()

    def _key(self):
        return (self.indices.tobytes(), self.size, tuple(self.groups.items()), self.signature)

    def __eq__(self, other):  # by value: two fits of the same model share compiled functions
        return isinstance(other, Subspace) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def dim(self) -> int:
        return int(self.indices.size)

    @property
    def full(self) -> bool:
        return self.dim == self.size

    def restrict(self, tree) -> jax.Array:
        """The chosen coordinates of a params-shaped ``tree`` (leading axes kept: vmapped)."""
        flat = ravel_pytree(tree)[0]
        return flat if self.full else flat[self.indices]

    def embed(self, v) -> PyTree:
        """A params-shaped tree holding ``v`` at the chosen coordinates, zeros elsewhere."""
        flat = v if self.full else jnp.zeros((self.size,), v.dtype).at[self.indices].set(v)
        return self.unravel(flat)

    @functools.cached_property
    def positions(self) -> tuple[int, ...] | None:
        """Where the chosen coordinates are whole params arrays: their positions among the
        params' leaves (``jax.tree_util.tree_leaves`` order, which is the flat order); ``None``
        when an array is chosen in part. On these arrays a vector needs no flat copy
        (``select``, ``place``)."""
        if not self.signature:
            return None
        sizes = [int(np.prod(shape)) for shape, _ in self.signature[1]]
        chosen = np.zeros(self.size, bool)
        chosen[self.indices] = True
        offsets, found = np.cumsum([0, *sizes]), []
        for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            if b > a and chosen[a:b].all():
                found.append(i)
            elif chosen[a:b].any():
                return None
        return tuple(found)

    def like(self) -> list:
        """The chosen arrays' ``jax.ShapeDtypeStruct`` (``positions`` must not be ``None``)."""
        return [jax.ShapeDtypeStruct(self.signature[1][i][0], self.signature[1][i][1]) for i in self.positions]

    def select(self, tree) -> list:
        """The chosen arrays of a params-shaped ``tree``, in flat order: ``restrict`` without the
        flat copy (``concatenate(ravel(a) for a in select(t)) == restrict(t)``)."""
        leaves = jax.tree_util.tree_leaves(tree)
        return [leaves[i] for i in self.positions]

    def place(self, arrays) -> PyTree:
        """The params-shaped tree holding ``arrays`` (``select``'s order), zeros elsewhere:
        ``embed`` without the flat copy."""
        treedef, specs = self.signature
        out = [jnp.zeros(shape, dtype) for shape, dtype in specs]
        for i, a in zip(self.positions, arrays, strict=True):
            out[i] = a
        return jax.tree_util.tree_unflatten(treedef, out)

    def rows(self, arrays) -> jax.Array:
        """``(m, dim)`` from ``select``-ordered arrays that each carry a leading ``m`` axis."""
        return jnp.concatenate([jnp.reshape(a, (a.shape[0], -1)) for a in arrays], axis=1)


def subspace(model: Layer, params, layers=None) -> Subspace:
    """The coordinates of some layers' parameters.

    Args:
        model: the model.
        params: its params.
        layers: ``None`` (every parameter), a path or a list of paths (``"2"``,
            ``"block/attention"``; a path naming a sub-model takes all its leaves).

    Returns:
        A ``Subspace``.

    Raises:
        InputError: a path that names no layer with parameters (the message lists the paths).
    """
    flat, unravel = ravel_pytree(params)
    paths = leaf_paths(model, params)
    wanted = paths if layers is None else [layers] if isinstance(layers, str) else list(layers)
    chosen = {p for p in paths for w in wanted if p == w or p.startswith(w + "/") or w == ""}
    missing = [w for w in wanted if not any(p == w or p.startswith(w + "/") or w == "" for p in paths)]
    if missing:
        raise InputError(repr(model), f"no layer with parameters at {missing}; the layers with parameters are "
                                      f"{paths}")
    marks = map_leaf_params(model, params, lambda path, layer, p: jax.tree_util.tree_map(
        lambda a: np.full(np.shape(a), paths.index(path) if path in chosen else -1), p))
    owner = np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(marks)] or [np.zeros(0, int)])
    indices = np.nonzero(owner >= 0)[0]
    chosen_owner = owner[indices]
    groups, start = {}, 0
    for run in np.split(chosen_owner, np.nonzero(np.diff(chosen_owner))[0] + 1) if chosen_owner.size else []:
        path = paths[int(run[0])]
        if path in groups:
            raise InputError(repr(model), f"the parameters of {path!r} are not contiguous in the flat params")
        groups[path] = (start, start + run.size)
        start += run.size
    leaves, treedef = jax.tree_util.tree_flatten(params)
    signature = (treedef, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in leaves))
    return Subspace(indices, int(flat.size), unravel, groups, signature)


__all__ = ["Subspace", "leaf_paths", "subspace"]
