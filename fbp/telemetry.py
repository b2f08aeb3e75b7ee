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
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from fbp.core import (
    InputError,
    Layer,
    Loss,
    check_gradient_structure,
    describe,
    map_leaf_params,
    require_state_mode,
    run_forward,
    with_context,
)
from fbp.deviation import exact_model
from fbp.extensions import Extension
from fbp.probes import probe_model, split_probed
from fbp.telemetry_history import leaf_paths, plot_gradient_flow, record_epoch  # noqa: F401  (public here)
from fbp.validation import typed_arguments

PyTree = Any
STATS = ("out_mean", "out_std", "out_absmax", "out_zero_fraction", "d_out_norm", "d_in_norm", "param_norm",
         "d_params_norm", "nonfinite")
DETAIL = ("nonfinite_out", "nonfinite_d_out", "nonfinite_d_params")  # the parts of "nonfinite"
GRADIENT_FLOW = ("d_out_norm", "d_in_norm", "param_norm", "d_params_norm")  # none reads a layer's output


def floating_leaves(tree) -> list:
    """The floating-point (and complex) leaves of a pytree; integer leaves (step counters) are left out.

    Args:
        tree: any pytree.

    Returns:
        A list of its inexact leaves, in ``tree_leaves`` order.
    """
    return [a for a in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]


def _sum_sq(a) -> jax.Array:
    ft = jnp.result_type(float)
    return jnp.sum(jnp.square(a.astype(ft)))


def _norm(tree) -> jax.Array:
    ft = jnp.result_type(float)
    return jnp.sqrt(sum((_sum_sq(a) for a in floating_leaves(tree)), jnp.zeros((), ft)))


def _count_nonfinite(leaves, witness) -> jax.Array:
    """How many entries of ``leaves`` are NaN/inf. ``witness`` (their sum of squares) is finite
    whenever they all are, so the counting pass runs only when it is not (``lax.cond``; under
    ``vmap`` both branches run and the answer is the same)."""
    ft = jnp.result_type(float)

    def count(leaves):
        return sum((jnp.sum(~jnp.isfinite(a)).astype(ft) for a in leaves), jnp.zeros((), ft))

    return jax.lax.cond(jnp.isfinite(witness), lambda leaves: jnp.zeros((), ft), count, leaves)


def _nonfinite(tree) -> jax.Array:
    leaves = floating_leaves(tree)
    ft = jnp.result_type(float)
    return _count_nonfinite(leaves, sum((_sum_sq(a) for a in leaves), jnp.zeros((), ft)))


def _output_stats(y, want: frozenset[str], rows=None) -> dict[str, jax.Array]:
    """The wanted ones of: mean, standard deviation (``sqrt(E[y²] - mean²)``, clamped at 0: no
    second pass that waits for the mean), max |y|, the fraction of zeros, the non-finite count;
    over the rows ``rows`` marks (``(B,)`` bools; ``None``: every row — a DP-SGD buffer's
    padding rows are left out)."""
    ft = jnp.result_type(float)
    zero = jnp.zeros((), ft)
    leaves = [a for a in floating_leaves(y) if a.size]
    n, kept = max(sum(a.size for a in leaves), 1), [jnp.ones((), bool)] * len(leaves)
    if rows is not None:
        kept = [rows.reshape(rows.shape + (1,) * (a.ndim - 1)) for a in leaves]
        n = jnp.maximum(sum((jnp.sum(rows, dtype=ft) * (a.size // a.shape[0]) for a in leaves), zero), 1)
        leaves = [jnp.where(m, a, 0) for a, m in zip(leaves, kept, strict=True)]
    out = {}
    total = sum((jnp.sum(a, dtype=ft) for a in leaves), zero) if want & {"out_mean", "out_std"} else None
    total_sq = sum((_sum_sq(a) for a in leaves), zero) if want & {"out_std", "nonfinite_out"} else None
    if "out_mean" in want:
        out["out_mean"] = total / n
    if "out_std" in want:
        out["out_std"] = jnp.sqrt(jnp.maximum(total_sq / n - (total / n) ** 2, 0))
    if "out_absmax" in want:
        out["out_absmax"] = jnp.max(jnp.asarray([jnp.max(jnp.abs(a)).astype(ft) for a in leaves] or [zero]))
    if "out_zero_fraction" in want:  # counted in int32: exact up to 2**31 entries
        out["out_zero_fraction"] = sum((jnp.sum((a == 0) & m, dtype=jnp.int32) for a, m in
                                        zip(leaves, kept, strict=True)), 0).astype(ft) / n
    if "nonfinite_out" in want:
        out["nonfinite_out"] = _count_nonfinite(leaves, total_sq)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class _StatsHook:
    """Telemetry at one leaf, as a hook of the one probe (``fbp.probes``): the output statistics
    in the forward, the cotangent and gradient ones in the backward."""

    want: frozenset = frozenset(STATS)  # the statistics to compute (with "nonfinite": its three parts)
    skip_d_out: bool = False  # the cotangent at this layer's output is one training never computes
    skip_d_in: bool = False  # likewise the one at its input
    rows: Any = None  # (B,) bools: the output statistics read only these rows (None: all)
    name: ClassVar[str] = "stats"

    def from_output(self, y):
        return _output_stats(y, self.want, self.rows)

    def from_backward(self, part, d_y, d_x, d_params, params):
        param_norm = _norm(params) if "param_norm" in self.want else None
        stats = _backward_stats(self.want, part, d_y, d_x, d_params, param_norm, self.skip_d_out, self.skip_d_in)
        return {k: stats[k] for k in sorted(self.want)}


def _backward_stats(want, out, d_y, d_x, d_params, param_norm, skip_d_out=False, skip_d_in=False) -> dict:
    """The output statistics ``out`` with the backward's: cotangent and gradient norms, the
    parameter norm, the non-finite counts (NaN for a cotangent training never computes)."""
    ft = jnp.result_type(float)
    nan, zero = jnp.full((), jnp.nan, ft), jnp.zeros((), ft)
    stats = dict(out)
    if want & {"d_out_norm", "nonfinite_d_out"}:
        d_out_sq = nan if skip_d_out else sum((_sum_sq(a) for a in floating_leaves(d_y)), zero)
        if "d_out_norm" in want:
            stats["d_out_norm"] = jnp.sqrt(d_out_sq)
        if "nonfinite_d_out" in want:
            stats["nonfinite_d_out"] = zero if skip_d_out else _count_nonfinite(floating_leaves(d_y), d_out_sq)
    if "d_in_norm" in want:
        stats["d_in_norm"] = nan if skip_d_in else _norm(d_x)
    if "param_norm" in want:
        stats["param_norm"] = param_norm
    if want & {"d_params_norm", "nonfinite_d_params"}:
        d_params_norm = _norm(d_params)
        if "d_params_norm" in want:
            stats["d_params_norm"] = d_params_norm
        if "nonfinite_d_params" in want:
            stats["nonfinite_d_params"] = _count_nonfinite(floating_leaves(d_params), d_params_norm)
    if "nonfinite" in want:
        stats["nonfinite"] = stats["nonfinite_out"] + stats["nonfinite_d_out"] + stats["nonfinite_d_params"]
    return stats


def _wanted(names) -> frozenset:
    """The statistics to compute: ``names`` (default all of STATS), with the parts "nonfinite" adds."""
    chosen = STATS if names is None else tuple([names] if isinstance(names, str) else names)
    unknown = [n for n in chosen if n not in STATS]
    if unknown or not chosen:
        raise ValueError(f"telemetry: stats must be a non-empty selection of {STATS}, got {names!r}")
    return frozenset(chosen) | (frozenset(DETAIL) if "nonfinite" in chosen else frozenset())


def probe(model: Layer, want: frozenset, skip: dict[str, tuple[bool, bool]] | None = None, rows=None) -> Layer:
    """``model`` with every leaf layer probed for its statistics: same paths, same forward,
    statistics on the side — the per-example probe (``fbp.probes``) with telemetry's hook at
    every leaf and no per-example quantity.

    Args:
        model: the model.
        want: the statistics to compute (names from ``STATS`` and the parts of ``nonfinite``).
        skip: ``{path: (skip_d_out, skip_d_in)}`` for cotangents not to compute (see ``input_side``).
        rows: ``(B,)`` bools: the output statistics read only these rows (``None``: all).

    Returns:
        The probed model; its params are ``(θ, None)`` at every leaf, its ``d_params``
        ``(∂L/∂θ, {"layer": {"stats": {name: value}}})``.
    """
    skip = skip or {}
    return probe_model(model, (), {}, lambda path: (_StatsHook(want, *skip.get(path, (False, False)), rows),),
                       check=False)


def input_side(model: Layer, params: PyTree) -> dict[str, tuple[bool, bool]]:
    """The leaves whose cotangents training never computes.

    Every leaf before the first one with parameters (forward order) sends its ``d_x`` toward the
    model's input only, and the first one with parameters has no use for its own ``d_x``. XLA
    removes those computations from a training step (the input gradient of the first Dense or
    convolution: one more matmul or convolution), and so does telemetry unless asked.

    Args:
        model: the model.
        params: its params (to see which leaves have parameters).

    Returns:
        ``{path: (no d_out, no d_in)}`` for the leaves up to the first with parameters.
    """
    skip: dict[str, tuple[bool, bool]] = {}
    for path, p in _leaf_entries(model, params):
        has_params = bool(floating_leaves(p))
        skip[path] = (not has_params, True)
        if has_params:
            break
    return skip


def _split(model: Layer, d_probed: PyTree) -> tuple[PyTree, dict[str, dict[str, jax.Array]]]:
    grads, found = split_probed(model, d_probed)
    return grads, {path: got["layer"]["stats"] for path, got in found.items()}


def _angle(rule, exact) -> jax.Array:
    """Degrees between two parameter gradients of one layer (NaN if either is zero)."""
    a, b = floating_leaves(rule), floating_leaves(exact)
    dot = sum(jnp.vdot(u, v) for u, v in zip(a, b, strict=True))
    norms = _norm(a) * _norm(b)
    cos = jnp.clip(dot / jnp.where(norms > 0, norms, 1), -1, 1)
    return jnp.where(norms > 0, jnp.degrees(jnp.arccos(cos)), jnp.nan)


@dataclasses.dataclass(frozen=True)
class Instrumented:
    """A model, and — if it has rules that deviate from the gradient — its exact twin.

    The twin's backward runs on the residuals of the model's forward. ``run`` probes both at
    trace time.

    Args:
        model: the model.
        exact: its exact twin (``fbp.deviation.exact_model``), or ``None``.
        input_cotangents: also compute the cotangents training never needs (``input_side``).
        want: the statistics to compute.
    """

    model: Layer
    exact: Layer | None
    input_cotangents: bool = False
    want: frozenset = frozenset(STATS) | frozenset(DETAIL)

    @classmethod
    def of(cls, model: Layer, alignment: bool | None, input_cotangents: bool = False, stats=None) -> Instrumented:
        for name, value in (("alignment", alignment), ("input_cotangents", input_cotangents)):
            if not (isinstance(value, bool) or (value is None and name == "alignment")):
                raise TypeError(f"telemetry: {name} must be True or False{' or None' if name == 'alignment' else ''}"
                                f", got {type(value).__name__} {value!r}")
        exact = exact_model(model) if alignment is not False else None
        if alignment and exact is None:
            raise InputError(repr(model), "alignment angles need layers with an exact VJP beside their rule "
                                          "(fbp.credit, fbp.nn.hooks); this model has none, or has a quantiser "
                                          "whose true derivative is zero")
        return cls(model, exact, input_cotangents, _wanted(stats))

    def run(self, loss: Loss, params, x, y, *, state=None, key=None, train=True, detail=False, policy=None,
            scale=1.0, weights=None):
        """``(value, grads, pred, new_state, stats)`` from one forward and one backward pass.

        ``policy`` (a ``fbp.precision.Policy``): the layers run in ``policy.compute``, the loss in
        ``policy.output``, grads and state come back in ``policy.params``; the backward is seeded
        with ``scale`` (a loss scale). ``weights`` (``(B,)``, held constant): the pass
        differentiates ``Σ_b w_b ℓ_b`` — DP-SGD's clipped pass, ``w_b = min(1, C/‖g_b‖)`` — and
        ``value`` is the per-example losses ``ℓ_b``; the output statistics then read only the
        rows with ``w_b ≠ 0`` (a Poisson buffer's padding rows are no part of the batch)."""
        if getattr(loss, "reduction", "mean") == "none":
            raise InputError(repr(loss), "telemetry differentiates a scalar loss: use reduction='mean' or 'sum'")
        batch = [a.shape[0] for a in jax.tree_util.tree_leaves(x) if getattr(a, "ndim", 0)]
        if not batch or 0 in batch:
            raise InputError("telemetry", f"needs a batch of at least one example; received x {describe(x)} (its "
                                          f"statistics are means over the batch)")
        skip = {} if self.input_cotangents else input_side(self.model, params)
        want = self.want | (frozenset(DETAIL) if detail else frozenset())
        rows = None if weights is None else weights != 0
        probed = probe(self.model, want, skip, rows)
        inner = params if policy is None else policy.cast(params, policy.compute)
        inner_state = state if policy is None or state is None else policy.cast(state, policy.compute)
        x_in = x if policy is None else policy.cast(x, policy.compute)
        slotted = map_leaf_params(self.model, inner, lambda path, leaf, p: (p, None))
        pred, res = run_forward(probed, slotted, x_in, state=inner_state, key=key, train=train)
        out = pred if policy is None else pred.astype(policy.output)
        each = loss if weights is None else dataclasses.replace(loss, reduction="none")
        value, loss_res = each.forward(out, y)
        seed = jnp.asarray(scale, value.dtype) if weights is None else \
            jax.lax.stop_gradient(weights).astype(value.dtype) * jnp.asarray(scale, value.dtype)
        d_pred = jax.tree_util.tree_map(lambda d, p: d.astype(p.dtype), each.backward(loss_res, seed), pred)
        grads, stats = _split(self.model, probed.backward(res, d_pred)[0])
        check_gradient_structure(self.model, inner, grads)
        if self.exact is not None:
            exact_grads, _ = _split(self.model, probe(self.exact, want, skip, rows).backward(res, d_pred)[0])
            grads_at = dict(_leaf_entries(self.model, grads))
            for path, g_exact in _leaf_entries(self.model, exact_grads):
                if floating_leaves(g_exact):
                    stats[path]["alignment_angle"] = _angle(grads_at[path], g_exact)
        if not detail:
            stats = {path: {k: v for k, v in s.items() if k not in DETAIL} for path, s in stats.items()}
        new_state = None if state is None else probed.next_state(inner_state, res)
        if policy is not None:
            grads = policy.cast(grads, policy.params)
            new_state = None if new_state is None else policy.cast(new_state, policy.params)
        return value, grads, out, new_state, stats


def _leaf_entries(model: Layer, params: PyTree) -> list[tuple[str, PyTree]]:
    out: list[tuple[str, PyTree]] = []
    map_leaf_params(model, params, lambda path, leaf, p: out.append((path, p)) or p)
    return out


@typed_arguments
def value_grad_and_stats(model: Layer, loss: Loss, *, has_state: bool = False, alignment: bool | None = None,
                         input_cotangents: bool = False, stats: Sequence[str] | None = None) -> Callable:
    """Like ``fbp.value_and_grad``, plus per-layer statistics from the same pass.

    Args:
        model: the network (a layer); every leaf layer is probed.
        loss: a mean- or sum-reduced loss.
        has_state: for models that keep state (BatchNorm, feedback matrices).
        alignment: add ``alignment_angle`` per layer with parameters (default: whenever the model
            has rules that deviate from the gradient and an exact VJP for each; ``False``: never;
            ``True``: required).
        input_cotangents: also compute the cotangents training never needs (below).
        stats: compute only these names from ``STATS`` (default: all).

    Returns:
        ``f(params, x, y, *, key=None) -> (value, grads, stats)``; with ``has_state=True``,
        ``f(params, state, x, y, *, key=None) -> (value, grads, new_state, stats)``. ``value``
        and ``grads`` equal ``fbp.value_and_grad``'s; ``stats[path][name]`` is a scalar for
        every leaf layer's path and every name in ``STATS`` (module docstring).

    Telemetry computes nothing that training does not already compute: the cotangents below the
    first layer with parameters (toward the input ``x``; for a model starting with a Dense, the
    first Dense's ``d_in_norm``) are NaN unless ``input_cotangents=True``, which adds their
    computation (the input gradient of that layer: one more matmul or convolution).

    ``stats``: compute only these names from ``STATS`` (default: all). Each statistic is a
    pass over an output or a cotangent; on a CPU, where a convolutional step is bound by memory
    traffic, choosing the ones you plot makes telemetry cheaper (``benchmarks/bench_toolkit.py``).
    """
    require_state_mode(model, has_state, "fbp.telemetry.value_grad_and_stats")
    inst = Instrumented.of(model, alignment, input_cotangents, stats)

    def body(params, x, y, *, state=None, key=None):
        value, grads, _, new_state, found = inst.run(loss, params, x, y, state=state, key=key)
        return (value, grads, new_state, found) if has_state else (value, grads, found)

    return with_context(model, has_state, "fbp.telemetry.value_grad_and_stats", body)


def zero_stats(model: Layer, loss: Loss, params, state, x, y, batch_size, stats=None):
    """Zeros shaped like one training step's statistics: ``fit``'s accumulator over an epoch.

    Shapes come from ``jax.eval_shape``, so nothing is computed.

    Args:
        model: the model.
        loss: the loss.
        params: the params.
        state: the model state (``None`` without).
        x: the training inputs (only the first batch's shape is used).
        y: the training targets.
        batch_size: the batch size, or ``None`` for the whole set.
        stats: the statistic names to compute, or ``None`` for all of ``STATS``.

    Returns:
        ``{path: {name: zeros}}`` with the dtypes and shapes of one step's statistics.
    """
    size = jnp.shape(x)[0] if batch_size is None else min(batch_size, jnp.shape(x)[0])
    key = jax.random.PRNGKey(0) if model.needs_key else None
    run = Instrumented.of(model, None, stats=stats).run
    shapes = jax.eval_shape(lambda p, s, xb, yb: run(loss, p, xb, yb, state=s, key=key)[4], params, state,
                            x[:size], y[:size])
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


# --------------------------------------------------------------------------- as an extension of the one pass
@dataclasses.dataclass(frozen=True)
class Stats(Extension):
    """Telemetry's per-layer statistics as an extension, ``q["stats"][path][name]`` for every
    leaf (parameter-free ones included), from the same pass as the gradient and any other
    extension. The same numbers as ``value_grad_and_stats(..., input_cotangents=True)`` without
    alignment angles. It reads batch statistics only, so it does not need the examples of a
    batch kept apart (BatchNorm in training mode is fine when no other extension asks).

    Args:
        names: the statistics, a selection of ``STATS`` (default: all of them; alignment angles
            need ``value_grad_and_stats(..., alignment=True)``).
    """

    names: tuple | None = None
    name: ClassVar[str] = "stats"
    needs: ClassVar[str] = "layer"
    requires_independence: ClassVar[bool] = False

    def __post_init__(self):
        names = STATS if self.names is None else self.names
        _wanted(names)  # unknown names are refused here
        object.__setattr__(self, "names", tuple(sorted([names] if isinstance(names, str) else names)))

    def from_output(self, y):
        return _StatsHook(_wanted(self.names)).from_output(y)

    def from_backward(self, part, d_y, d_x, d_params, params):
        stats = _StatsHook(_wanted(self.names)).from_backward(part, d_y, d_x, d_params, params)
        return {k: stats[k] for k in self.names}

    def finalize(self, found, context):
        """The pass's cotangents are those of ``Σ_b ℓ_b``: the norms are scaled to the reduced loss's."""
        cotangent = {"d_out_norm", "d_in_norm", "d_params_norm"}
        return {path: {k: v * context.scale if k in cotangent else v for k, v in stats.items()}
                for path, stats in found.items()}


@dataclasses.dataclass(frozen=True)
class Alignment(Extension):
    """Telemetry's alignment angle as an extension, ``q["alignment"][path]`` in degrees for every
    leaf with parameters: the angle between the layer's update from its rule (feedback alignment,
    straight-through, ...) and its exact gradient, the exact twin's backward run on the same
    forward's residuals (Lillicrap et al., 2016). The model needs deviating layers with an exact
    VJP (``fbp.credit``, ``fbp.nn.hooks``); ``value_grad_and_stats``' ``alignment_angle``."""

    name: ClassVar[str] = "alignment"
    needs: ClassVar[str] = "exact"
    requires_independence: ClassVar[bool] = False

    def finalize(self, found, context):
        return {path: _angle(context.leaf_grads[path], exact) for path, exact in found.items()
                if floating_leaves(exact)}
