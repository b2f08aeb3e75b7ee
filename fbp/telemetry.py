"""Per-layer telemetry, computed in the same forward and backward pass as the gradient.

Every leaf layer is wrapped in a probe that reads what the pass already holds — the layer's
output on the way forward, the cotangent arriving at its output and the one it sends to its
input on the way back — and returns a few scalars per layer through the gradient pytree. No
second backward pass, no host callbacks: the result is plain arrays, so ``jit``, ``vmap``
(per-example statistics) and ``lax.scan`` apply. For a leaf at path ``p`` with output ``y``,
output cotangent ``d_y = ∂L/∂y``, input cotangent ``d_x`` and parameters ``θ``::

    out_mean, out_std        mean and (population) standard deviation of the entries of y
    out_absmax               max |y|
    out_zero_fraction        fraction of entries of y that are exactly 0 (dead ReLUs)
    d_out_norm, d_in_norm    ‖d_y‖₂, ‖d_x‖₂  (all entries, the whole batch)
    param_norm, d_params_norm  ‖θ‖₂, ‖∂L/∂θ‖₂ over all of the layer's parameters
    nonfinite                non-finite entries in y, d_y and ∂L/∂θ together
    alignment_angle          (models with layers from fbp.credit or fbp.nn.hooks) the angle in
                             degrees between the layer's update direction from the rule and the
                             true gradient, from the same forward pass and fbp's exact rules
                             (Lillicrap et al., 2016, Fig. 2); 0° = the gradient, 90° = orthogonal

Paths are those of errors and check reports (``"0"``, ``"1/block/0"``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fbp.core import (
    InputError,
    Layer,
    Loss,
    check_gradient_structure,
    children,
    leaf_layers,
    map_leaf_params,
    require_state,
    require_state_mode,
    run_forward,
    transform_layers,
)
from fbp.credit import exact_model

PyTree = Any
STATS = ("out_mean", "out_std", "out_absmax", "out_zero_fraction", "d_out_norm", "d_in_norm", "param_norm",
         "d_params_norm", "nonfinite")
DETAIL = ("nonfinite_out", "nonfinite_d_out", "nonfinite_d_params")  # what fbp.debug reads


def floating_leaves(tree) -> list:
    return [a for a in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]


def _norm(tree) -> jax.Array:
    ft = jnp.result_type(float)
    return jnp.sqrt(sum((jnp.sum(jnp.square(a.astype(ft))) for a in floating_leaves(tree)), jnp.zeros((), ft)))


def _nonfinite(tree) -> jax.Array:
    ft = jnp.result_type(float)
    return sum((jnp.sum(~jnp.isfinite(a)).astype(ft) for a in floating_leaves(tree)), jnp.zeros((), ft))


def _output_stats(y) -> dict[str, jax.Array]:
    ft = jnp.result_type(float)
    leaves = [a.astype(ft) for a in floating_leaves(y)]
    n = max(sum(a.size for a in leaves), 1)
    mean = sum(jnp.sum(a) for a in leaves) / n
    return {"out_mean": mean,
            "out_std": jnp.sqrt(sum(jnp.sum(jnp.square(a - mean)) for a in leaves) / n),
            "out_absmax": jnp.max(jnp.asarray([jnp.max(jnp.abs(a)) if a.size else 0.0 for a in leaves] or [0.0])),
            "out_zero_fraction": sum(jnp.sum(a == 0).astype(ft) for a in leaves) / n,
            "nonfinite_out": _nonfinite(leaves)}


@dataclasses.dataclass(frozen=True)
class _Probe(Layer):
    """``layer`` with its statistics returned beside its gradient: params ``(θ, slots)``,
    d_params ``(∂L/∂θ, stats)`` — so they travel through every combinator untouched."""

    layer: Layer
    contextual = True

    @property
    def has_state(self):
        return self.layer.has_state

    @property
    def needs_key(self):
        return self.layer.needs_key

    def next_state(self, state, res):
        return self.layer.next_state(state, res[0])

    def forward(self, params, x, *, state=None, key=None, train=False):
        inner_params, _ = params
        y, res = run_forward(self.layer, inner_params, x, state=state, key=key, train=train)
        return y, (res, _output_stats(y), _norm(inner_params))

    def backward(self, res, d_y):
        inner, out, param_norm = res
        d_params, d_x = self.layer.backward(inner, d_y)
        stats = {**{k: v for k, v in out.items()}, "d_out_norm": _norm(d_y), "d_in_norm": _norm(d_x),
                 "param_norm": param_norm, "d_params_norm": _norm(d_params),
                 "nonfinite_d_out": _nonfinite(d_y), "nonfinite_d_params": _nonfinite(d_params)}
        stats["nonfinite"] = stats["nonfinite_out"] + stats["nonfinite_d_out"] + stats["nonfinite_d_params"]
        return (d_params, stats), d_x


_SLOTS = (*STATS, *DETAIL)


def probe(model: Layer) -> Layer:
    """``model`` with every leaf layer wrapped in a probe (same paths, same forward)."""
    return transform_layers(model, lambda path, layer: None if children(layer) else _Probe(layer))


def _with_slots(model: Layer, params: PyTree) -> PyTree:
    slots = {name: jnp.zeros((), jnp.result_type(float)) for name in _SLOTS}
    return map_leaf_params(model, params, lambda path, leaf, p: (p, slots))


def _split(model: Layer, d_probed: PyTree) -> tuple[PyTree, dict[str, dict[str, jax.Array]]]:
    stats: dict[str, dict[str, jax.Array]] = {}

    def take(path, leaf, d):
        stats[path] = d[1]
        return d[0]

    return map_leaf_params(model, d_probed, take), stats


def _angle(rule, exact) -> jax.Array:
    """Degrees between two parameter gradients of one layer (NaN if either is zero)."""
    a, b = floating_leaves(rule), floating_leaves(exact)
    dot = sum(jnp.vdot(u, v) for u, v in zip(a, b))
    norms = _norm(a) * _norm(b)
    cos = jnp.clip(dot / jnp.where(norms > 0, norms, 1), -1, 1)
    return jnp.where(norms > 0, jnp.degrees(jnp.arccos(cos)), jnp.nan)


@dataclasses.dataclass(frozen=True)
class Instrumented:
    """A model with its probed twin, and — if it has rules that deviate from the gradient — the
    probed exact twin whose backward runs on the same residuals."""

    model: Layer
    probed: Layer
    exact: Layer | None

    @classmethod
    def of(cls, model: Layer, alignment: bool | None) -> Instrumented:
        exact = exact_model(model) if alignment is not False else None
        if alignment and exact is None:
            raise InputError(repr(model), "alignment angles need layers with an exact VJP beside their rule "
                                          "(fbp.credit, fbp.nn.hooks); this model has none, or has a quantiser "
                                          "whose true derivative is zero")
        return cls(model, probe(model), None if exact is None else probe(exact))

    def run(self, loss: Loss, params, x, y, *, state=None, key=None, train=True, detail=False):
        """``(value, grads, pred, new_state, stats)`` from one forward and one backward pass."""
        if getattr(loss, "reduction", "mean") == "none":
            raise InputError(repr(loss), "telemetry differentiates a scalar loss: use reduction='mean' or 'sum'")
        pred, res = run_forward(self.probed, _with_slots(self.model, params), x, state=state, key=key, train=train)
        value, loss_res = loss.forward(pred, y)
        d_pred = loss.backward(loss_res, jnp.ones((), value.dtype))
        grads, stats = _split(self.model, self.probed.backward(res, d_pred)[0])
        check_gradient_structure(self.model, params, grads)
        if self.exact is not None:
            exact_grads, _ = _split(self.model, self.exact.backward(res, d_pred)[0])
            grads_at = dict(_leaf_entries(self.model, grads))
            for path, g_exact in _leaf_entries(self.model, exact_grads):
                if floating_leaves(g_exact):
                    stats[path]["alignment_angle"] = _angle(grads_at[path], g_exact)
        if not detail:
            stats = {path: {k: v for k, v in s.items() if k not in DETAIL} for path, s in stats.items()}
        new_state = None if state is None else self.probed.next_state(state, res)
        return value, grads, pred, new_state, stats


def _leaf_entries(model: Layer, params: PyTree) -> list[tuple[str, PyTree]]:
    out: list[tuple[str, PyTree]] = []
    map_leaf_params(model, params, lambda path, leaf, p: out.append((path, p)) or p)
    return out


def value_grad_and_stats(model: Layer, loss: Loss, *, has_state: bool = False,
                         alignment: bool | None = None) -> Callable:
    """Like :func:`fbp.value_and_grad`, plus per-layer statistics from the same pass.

    Returns ``f(params, x, y, *, key=None) -> (value, grads, stats)``; with ``has_state=True``,
    ``f(params, state, x, y, *, key=None) -> (value, grads, new_state, stats)``. ``value`` and
    ``grads`` equal ``fbp.value_and_grad``'s; ``stats[path][name]`` is a scalar for every leaf
    layer's path and every name in :data:`STATS` (module docstring). ``alignment``: add
    ``alignment_angle`` per layer with parameters (default: whenever the model has rules that
    deviate from the gradient and an exact VJP for each; ``False``: never; ``True``: required).
    """
    require_state_mode(model, has_state, "fbp.telemetry.value_grad_and_stats")
    inst = Instrumented.of(model, alignment)
    if has_state:
        def with_state(params, state, x, y, *, key=None):
            require_state(model, state, "fbp.telemetry.value_grad_and_stats")
            value, grads, _, new_state, stats = inst.run(loss, params, x, y, state=state, key=key)
            return value, grads, new_state, stats

        return with_state

    def without_state(params, x, y, *, key=None):
        value, grads, _, _, stats = inst.run(loss, params, x, y, key=key)
        return value, grads, stats

    return without_state


def leaf_paths(model: Layer) -> list[str]:
    """The paths ``stats`` is keyed by, in forward order."""
    return [path for path, _ in leaf_layers(model)]


def plot_gradient_flow(history: dict[str, dict[str, Any]], *, stat: str = "d_out_norm", ax=None, log: bool = True):
    """Plot ``stat`` per layer over epochs from ``FitResult.telemetry`` (one line per layer path).

    With the default ``d_out_norm`` this is gradient flow: vanishing gradients show as lines
    falling toward the input layers, exploding ones as lines rising. Returns the figure.
    """
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_gradient_flow: no telemetry recorded (fit(..., telemetry=True))")
    fig, ax = (plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax))
    for path, stats in history.items():
        if stat not in stats:
            continue
        values = stats[stat]
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=path or "<root>")
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(stat)
    ax.set_title(f"{stat} per layer (path), epoch means")
    ax.legend(fontsize="small", ncol=max(1, math.ceil(len(history) / 12)), title="layer")
    fig.tight_layout()
    return fig
