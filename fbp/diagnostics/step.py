"""Diagnostics of the update itself: α, the update's size and ratio, the distance travelled.

**α** (Cockpit's effective relative step size; Schneider et al., 2021): along the update
``d = θ₁ − θ₀`` of length ``t = ‖d‖``, fit a parabola ``q(s) = μ₀ + μ₁ s + μ₂ s²`` to four noisy
observations — the loss and its directional derivative ``dᵀ∇L/‖d‖`` at the start (this step's
batch at ``θ₀``) and at the end (the next step's batch at ``θ₁``) — by least squares weighted
with each observation's variance over the batch's examples (the per-example losses and the
per-example projections ``g_bᵀ d/‖d‖``, sample variances). Then
``α = 2t / (−μ₁/μ₂) − 1``: −1 means the step stayed where it was (or the parabola is
concave: still downhill), 0 that it landed in the valley's minimum, 1 that it crossed to the
same height on the other side; above 1 the step overshoots (the learning rate is too large),
near −1 it creeps (too small).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import map_leaf_params

EPS = 1e-10  # Cockpit's stand-in for a zero variance or step


class Point(NamedTuple):
    """One end of the step: the loss, its variance, the directional derivative and its variance."""

    f: jax.Array
    var_f: jax.Array
    df: jax.Array
    var_df: jax.Array


def point(losses, projections) -> Point:
    """An end of the step, with sample variances (``ddof=1``).

    Args:
        losses: the per-example losses ``u_b`` (their mean is the reduced loss).
        projections: the per-example projections ``∇u_bᵀ d/‖d‖``.

    Returns:
        The ``Point``.
    """
    return Point(jnp.mean(losses), jnp.var(losses, ddof=1), jnp.mean(projections), jnp.var(projections, ddof=1))


def alpha(start: Point, end: Point, t) -> jax.Array:
    """α of a step of length ``t`` between two observed points (module docstring).

    Args:
        start: the observation at the start (``s = 0``).
        end: the observation at the end (``s = t``).
        t: the step's length ``‖d‖``.

    Returns:
        α; −1 for a step of length 0 or a concave fit (as Cockpit).
    """
    t = jnp.asarray(t)
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    phi = jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([one, t, t * t]),  # f(0), f(t)
                     jnp.stack([zero, one, zero]), jnp.stack([zero, one, 2 * t])])  # f'(0), f'(t)
    obs = jnp.stack([start.f, end.f, start.df, end.df])
    var = jnp.stack([start.var_f, end.var_f, start.var_df, end.var_df])
    w = 1.0 / jnp.where(var == 0, EPS, var)
    mu = jnp.linalg.solve(phi.T @ (w[:, None] * phi), phi.T @ (w * obs))
    out = 2 * t / (-mu[1] / mu[2]) - 1
    return jnp.where((t == 0) | (mu[2] < 0), -1.0, out)


def _norms(model, tree) -> dict:
    out: dict = {}

    def leaf(path, layer, p):
        leaves = [a for a in jax.tree_util.tree_leaves(p) if jnp.issubdtype(a.dtype, jnp.inexact)]
        if leaves:
            out[path] = jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in leaves))
        return p

    map_leaf_params(model, tree, leaf)
    return out


def _total(layers: dict):
    return jnp.sqrt(sum((jnp.square(v) for v in layers.values()), jnp.zeros(())))


def update_size(model, updates) -> dict:
    """The update's norm ``‖Δθ‖``, whole and per leaf (Cockpit's UpdateSize).

    Args:
        model: the model.
        updates: the update, shaped like its params.

    Returns:
        ``{"total", "layers": {path: norm}}``.
    """
    layers = _norms(model, updates)
    return {"total": _total(layers), "layers": layers}


def update_ratio(model, updates, params) -> dict:
    """``‖Δθ‖ / ‖θ‖`` per leaf and whole: the update-to-parameter ratio (around 1e-3 is the
    folklore healthy value for SGD-like training).

    Args:
        model: the model.
        updates: the update.
        params: the params before it.

    Returns:
        ``{"total", "layers": {path: ratio}}``.
    """
    step, size = _norms(model, updates), _norms(model, params)
    return {"total": _total(step) / _total(size), "layers": {p: step[p] / size[p] for p in step}}


def distance(model, params, init) -> dict:
    """``‖θ − θ_init‖`` per leaf and whole (Cockpit's Distance).

    Args:
        model: the model.
        params: the params now.
        init: the params at the start.

    Returns:
        ``{"total", "layers": {path: distance}}``.
    """
    layers = _norms(model, jax.tree_util.tree_map(lambda a, b: a - b, params, init))
    return {"total": _total(layers), "layers": layers}
