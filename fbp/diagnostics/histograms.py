"""Histograms of the per-example gradient elements (Cockpit's GradHist1d and GradHist2d).

Every element of every example's gradient ``(g_b)_i`` is counted in fixed bins; values outside
the range are clamped into its edge bins (as Cockpit), so the counts always total ``B × P``.
The 2-D histogram pairs each element with its parameter's value ``θ_i``: where the
individual gradients of large weights spread tells whether a layer is learning or saturated.
Both read what the ``"project"`` probes keep (``fbp.probes``). A leaf whose ``B × P_leaf``
per-example elements number at most ``max_exact`` is counted exactly (its per-example
gradients materialised, as BackPACK's BatchGrad under Cockpit). A larger Dense-like weight is
*sampled*: ``samples`` elements ``(b, i, j)`` drawn uniformly, each ``Σ_t x_bti g_btj`` from
the layer's inputs and output cotangents (``Positions.sample``: ``samples × T`` products, no
per-example gradient) — or, where the norms materialise that layer's per-example gradients
anyway (``fbp.probes.project``), drawn from them — counted with weight ``B·P_leaf / samples``
— an unbiased estimate of the
histogram, whose relative error in a bin holding a fraction ``q`` of the elements is about
``sqrt((1 − q)/(q · samples))``. Biases and other small parameters are always exact. So the
counts always total ``B × P`` (exactly for the exact leaves, in expectation for the sampled ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fbp.diagnostics.moments import by_leaf
from fbp.extensions import Extension
from fbp.probes import _at


def bin_index(values, bins: int, low: float, high: float, centre_clamp: bool = False):
    """Each value's bin among ``bins`` equal bins on ``[low, high]``, clamped into range.

    Args:
        values: the values.
        bins: the number of bins.
        low: the lower edge.
        high: the upper edge.
        centre_clamp: clamp outliers to the edge bins' centres first (Cockpit's 2-D histogram).

    Returns:
        int32 bin indices, shaped like ``values``.
    """
    width = (high - low) / bins
    if centre_clamp:
        values = jnp.clip(values, low + width / 2, high - width / 2)
    return jnp.clip(jnp.floor((values - low) / width), 0, bins - 1).astype(jnp.int32)


def _counts(index, length, weight=1.0):
    return jnp.bincount(index.ravel(), length=length).astype(jnp.float32) * weight


def elements(kept, params, key, samples: int, max_exact: int) -> list:
    """One leaf's per-example gradient elements: ``[(values, parameter values, weight)]``.

    Args:
        kept: the leaf's ``"project"`` quantity (``fbp.probes``).
        params: the leaf's params.
        key: the sampling key.
        samples: elements drawn per sampled kernel.
        max_exact: count a leaf exactly up to this many per-example elements.

    Returns:
        Arrays of values with their parameters' values (same shape) and each one's weight.
    """
    def exact(per):  # {key: (B, *shape)}
        return [(v, jnp.broadcast_to(_at(params, k), v.shape), 1.0) for k, v in per.items()]

    if "groups" not in kept:  # the layer's own per-example gradients (positions are sampled instead)
        flat = jax.tree_util.tree_leaves(kept["per"])
        return [(v, jnp.broadcast_to(p, v.shape), 1.0) for v, p in zip(flat, jax.tree_util.tree_leaves(params),
                                                                         strict=True)]
    groups, out = kept["groups"], exact(kept["rest"])
    batch = groups[0].g.shape[0] if groups else 0
    size = sum(a.size for a in jax.tree_util.tree_leaves(params))
    if "per" in kept and batch * size > max_exact:  # materialised for the norms: draw from them, not from (x, g)
        return _drawn(kept["per"], params, key, samples)
    for n, group in enumerate(groups):
        if batch * size <= max_exact:
            out += exact(group.grads())
            continue
        for kernel, values, _, rows, cols, weight in group.sample(jax.random.fold_in(key, n), samples):
            matrix = _at(params, kernel).reshape(-1, group.g.shape[-1])
            out.append((values, matrix[rows, cols], weight))
        if group.bias is not None:
            out += exact({group.bias: group.g.sum(axis=1)})
    return out


def _drawn(per, params, key, samples: int) -> list:
    """``samples`` uniform draws ``(b, i)`` from each materialised per-example kernel (biases
    and other 1-D leaves exact), weighted ``B·P_leaf / samples`` as ``Positions.sample``'s."""
    out = []
    for n, (v, p) in enumerate(zip(jax.tree_util.tree_leaves(per), jax.tree_util.tree_leaves(params), strict=True)):
        if p.ndim < 2:
            out.append((v, jnp.broadcast_to(p, v.shape), 1.0))
            continue
        keys = jax.random.split(jax.random.fold_in(key, n), 2)
        ex = jax.random.randint(keys[0], (samples,), 0, v.shape[0])
        at = jax.random.randint(keys[1], (samples,), 0, p.size)
        out.append((v.reshape(v.shape[0], -1)[ex, at], p.reshape(-1)[at], v.shape[0] * p.size / samples))
    return out


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class _Sampled(Extension):
    """What both histograms share: the sampling settings and the walk over every leaf's elements."""

    samples: int = 1 << 12
    max_exact: int = 1 << 18
    key: Any = None
    needs: ClassVar[str] = "project"

    def leaf_elements(self, found, context, default_key: int):
        """``(path, [(values, parameter values, weight)])`` for every leaf (``elements``)."""
        key = jax.random.key(default_key) if self.key is None else self.key
        leaves = by_leaf(context.model, context.params)
        for i, (path, kept) in enumerate(found.items()):
            yield path, elements(kept, leaves[path], jax.random.fold_in(key, i), self.samples, self.max_exact)


@dataclasses.dataclass(frozen=True, eq=False)
class GradHistogram1d(_Sampled):
    """``{"counts": (bins,), "edges": (bins+1,), "layers": {path: counts}}``: per-example
    gradient elements in ``bins`` bins on ``range`` (Cockpit's defaults: 100 on ``(-2, 2)``),
    exact up to ``max_exact`` elements per leaf, sampled above (module docstring).

    Args:
        bins: the number of bins.
        range: ``(low, high)``.
        samples: elements drawn per sampled kernel.
        max_exact: per-example elements per leaf counted exactly.
        key: the sampling key (build the extension inside the jitted step to vary it).
    """

    bins: int = 100
    range: tuple = (-2.0, 2.0)
    name: ClassVar[str] = "grad_hist_1d"

    def finalize(self, found, context):
        low, high = self.range
        layers = {path: sum((_counts(bin_index(v, self.bins, low, high), self.bins, w) for v, _, w in parts),
                            jnp.zeros((self.bins,))) for path, parts in self.leaf_elements(found, context, 0)}
        return {"counts": sum(layers.values(), jnp.zeros((self.bins,))),
                "edges": jnp.linspace(low, high, self.bins + 1), "layers": layers}


@dataclasses.dataclass(frozen=True, eq=False)
class GradHistogram2d(_Sampled):
    """``{"counts": (bins_g, bins_θ), "edges_grad", "edges_param"}``: per-example gradient
    elements against their parameter's value (Cockpit's defaults: ``(40, 50)`` bins on
    ``((-1, 1), (-2, 2))``, outliers clamped to the edge bins' centres); exact or sampled as
    ``GradHistogram1d``.

    Args:
        bins: ``(bins for the gradient, bins for the parameter)``.
        range: ``((low, high) of the gradient, (low, high) of the parameter)``.
        samples: elements drawn per sampled kernel.
        max_exact: per-example elements per leaf counted exactly.
        key: the sampling key.
    """

    bins: tuple = (40, 50)
    range: tuple = ((-1.0, 1.0), (-2.0, 2.0))
    name: ClassVar[str] = "grad_hist_2d"

    def finalize(self, found, context):
        (bg, bp), ((gl, gh), (pl, ph)) = self.bins, self.range
        counts = jnp.zeros((bg * bp,))
        for _, parts in self.leaf_elements(found, context, 1):
            for v, p, w in parts:
                index = bin_index(v, bg, gl, gh, centre_clamp=True) * bp + bin_index(p, bp, pl, ph, centre_clamp=True)
                counts = counts + _counts(index, bg * bp, w)
        return {"counts": counts.reshape(bg, bp), "edges_grad": jnp.linspace(gl, gh, bg + 1),
                "edges_param": jnp.linspace(pl, ph, bp + 1)}
