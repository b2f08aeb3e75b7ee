"""A K-FAC block's entries of a layer's params as one matrix ``W: (fan_in [+1], n_out)`` and
back (``fbp.curvature.KroneckerBlock``'s layout): what the K-FAC optimizer preconditions and
``fbp.laplace``'s Kronecker structures rotate. Split from ``fbp.curvature``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _get(tree, key: tuple):
    for k in key:
        tree = tree[k]
    return tree


def block_matrix(g, block) -> jax.Array:
    """A K-FAC block's entries of a leaf's params as one matrix.

    Args:
        g: the leaf layer's params-shaped tree (params, a gradient, a direction).
        block: the ``KroneckerBlock`` (its ``kernels`` and ``bias`` say where the entries are).

    Returns:
        ``W: (fan_in [+1], n_out)``: the kernels' rows stacked in order, the bias a last row.
    """
    n_out = block.G.shape[0]
    rows = [_get(g, key).reshape(-1, n_out) for key, _ in block.kernels]
    rows += [_get(g, block.bias)[None]] if block.bias is not None else []
    return jnp.concatenate(rows, axis=0)


def block_entries(w, block, g) -> dict:
    """``block_matrix``'s inverse.

    Args:
        w: a ``(fan_in [+1], n_out)`` matrix.
        block: the ``KroneckerBlock``.
        g: the leaf layer's params-shaped tree (for the entries' sizes).

    Returns:
        ``{key: entry}``, for ``fbp.nn.positions.assemble`` into ``g``.
    """
    out, start = {}, 0
    for key, shape in block.kernels:
        size = _get(g, key).size // block.G.shape[0]
        out[key] = w[start:start + size].reshape(shape)
        start += size
    if block.bias is not None:
        out[block.bias] = w[start]
    return out


__all__ = ["block_entries", "block_matrix"]
