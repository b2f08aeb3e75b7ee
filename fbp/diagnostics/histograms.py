"""Histograms of the per-example gradient elements (Cockpit's GradHist1d and GradHist2d).

Every element of every example's gradient ``(g_b)_i`` is counted in fixed bins; values outside
the range are clamped into its edge bins (as Cockpit), so the counts always total ``B × P``.
The 2-D histogram pairs each element with its parameter's value ``θ_i``: where the
individual gradients of large weights spread tells whether a layer is learning or saturated.
Both read the per-example gradients (``needs = "grads"``: each layer's per-example rule,
materialised — ``B`` times the parameters' memory at once, as BackPACK's BatchGrad under
Cockpit); pick them by name for a model whose ``B × P`` floats do not fit.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fbp.core import map_leaf_params
from fbp.extensions import Extension


def bin_index(values, bins: int, low: float, high: float, centre_clamp: bool = False):
    """Each value's bin among ``bins`` equal bins on ``[low, high]`` (clamped into range;
    ``centre_clamp``: outliers to the edge bins' centres first, as Cockpit's 2-D histogram)."""
    width = (high - low) / bins
    if centre_clamp:
        values = jnp.clip(values, low + width / 2, high - width / 2)
    return jnp.clip(jnp.floor((values - low) / width), 0, bins - 1).astype(jnp.int32)


def _counts(index, length):
    return jnp.bincount(index.ravel(), length=length).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class GradHistogram1d(Extension):
    """``{"counts": (bins,), "edges": (bins+1,), "layers": {path: counts}}``: per-example
    gradient elements in ``bins`` bins on ``range`` (Cockpit's defaults: 100 on ``(-2, 2)``).

    Args:
        bins: the number of bins.
        range: ``(low, high)``.
    """

    bins: int = 100
    range: tuple = (-2.0, 2.0)
    name: ClassVar[str] = "grad_hist_1d"
    needs: ClassVar[str] = "grads"

    def finalize(self, found, context):
        low, high = self.range
        layers = {path: sum((_counts(bin_index(a, self.bins, low, high), self.bins)
                             for a in jax.tree_util.tree_leaves(per)), jnp.zeros((self.bins,)))
                  for path, per in found.items()}
        return {"counts": sum(layers.values(), jnp.zeros((self.bins,))),
                "edges": jnp.linspace(low, high, self.bins + 1), "layers": layers}


@dataclasses.dataclass(frozen=True)
class GradHistogram2d(Extension):
    """``{"counts": (bins_g, bins_θ), "edges_grad", "edges_param"}``: per-example gradient
    elements against their parameter's value (Cockpit's defaults: ``(40, 50)`` bins on
    ``((-1, 1), (-2, 2))``, outliers clamped to the edge bins' centres).

    Args:
        bins: ``(bins for the gradient, bins for the parameter)``.
        range: ``((low, high) of the gradient, (low, high) of the parameter)``.
    """

    bins: tuple = (40, 50)
    range: tuple = ((-1.0, 1.0), (-2.0, 2.0))
    name: ClassVar[str] = "grad_hist_2d"
    needs: ClassVar[str] = "grads"

    def finalize(self, found, context):
        (bg, bp), ((gl, gh), (pl, ph)) = self.bins, self.range
        counts = jnp.zeros((bg * bp,))
        leaves: dict = {}
        map_leaf_params(context.model, context.params, lambda path, leaf, p: leaves.setdefault(path, p))
        for path, per in found.items():
            for g, p in zip(jax.tree_util.tree_leaves(per), jax.tree_util.tree_leaves(leaves[path]), strict=True):
                gi = bin_index(g, bg, gl, gh, centre_clamp=True)
                pi = jnp.broadcast_to(bin_index(p, bp, pl, ph, centre_clamp=True), g.shape)
                counts = counts + _counts(gi * bp + pi, bg * bp)
        return {"counts": counts.reshape(bg, bp), "edges_grad": jnp.linspace(gl, gh, bg + 1),
                "edges_param": jnp.linspace(pl, ph, bp + 1)}
