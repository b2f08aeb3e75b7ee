"""Diagnostics inside the jitted training step: which quantities, how often, and the step.

``fit(..., diagnostics="economy", diagnostics_every=N)`` runs, on every ``N``-th step, the
one-pass engine with the diagnostics' extensions (``fbp.engine``) instead of the plain
backward, then the optimizer's update, then the quantities of the update itself (α's ends,
the update's size and ratio, the distance from the initial params: ``fbp.diagnostics.step``);
the other steps run the plain pass (``lax.cond``: one compiled step). What outlives a step —
the initial params, the last update direction and α's start — lives in the optimizer state
(``DiagnosticsState``), so checkpoints resume bit-exactly and a mesh shards it like the rest.

Presets, named and sized like Cockpit's (Schneider, Dangel & Hennig, 2021):

* ``"economy"``: α, distance, the per-example gradient histogram, gradient norms, the inner
  product, norm and orthogonality tests, the loss, update size and ratio — and the gradient
  noise scale, which the norms give for free;
* ``"business"``: economy + TIC (diagonal) + the GGN trace + the gradient signal-to-noise ratio;
* ``"full"``: business + the GGN's largest eigenvalue + the 2-D gradient/parameter histogram.

By name, the trace and the TIC read the Monte-Carlo GGN diagonal (one sampled column per
example: one more backward, unbiased; Cockpit's ``diag_ggn_mc``) and the top eigenvalue runs
``WARM_ITERATIONS`` Lanczos steps warm-started from the previous diagnosed step's Ritz vector
(kept in the state): the exact trace costs one backward per class, and a cold Lanczos 20 GGN
products per step. Give instances for other settings (``GGNTrace()``: exact).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from fbp import engine
from fbp.core import value_grad_and_output
from fbp.diagnostics import curvature, histograms, moments, step
from fbp.extensions import Extension, check_extensions
from fbp.optim import apply_updates, learning_rate

# name -> the extension that computes it (built per step: some take the step's key)
_EXTENSIONS = {
    "noise_scale": lambda key: moments.NoiseScale(),
    "norm_test": lambda key: moments.NormTest(),
    "inner_test": lambda key: moments.InnerTest(),
    "ortho_test": lambda key: moments.OrthoTest(),
    "gradient_snr": lambda key: moments.GradientSNR(),
    "grad_norm": lambda key: moments.GradNorm(),
    "ggn_trace": lambda key: curvature.GGNTrace(method="mc"),
    "ggn_max_eigenvalue": lambda key: curvature.GGNMaxEigenvalue(iterations=WARM_ITERATIONS, key=key,
                                                                 with_vector=True),
    "tic_diag": lambda key: curvature.TICDiag(curvature="mc"),
    "grad_hist_1d": lambda key: histograms.GradHistogram1d(key=key),
    "grad_hist_2d": lambda key: histograms.GradHistogram2d(key=key),
}
WARM_ITERATIONS = 5  # Lanczos steps per diagnosed step, warm-started from the last one's Ritz vector
STEP_QUANTITIES = ("loss", "alpha", "update_size", "update_ratio", "distance")
ECONOMY = ("alpha", "distance", "grad_hist_1d", "grad_norm", "inner_test", "loss", "norm_test", "ortho_test",
           "update_size", "update_ratio", "noise_scale")
BUSINESS = ECONOMY + ("tic_diag", "ggn_trace", "gradient_snr")
FULL = BUSINESS + ("ggn_max_eigenvalue", "grad_hist_2d")
PRESETS = {"economy": ECONOMY, "business": BUSINESS, "full": FULL}
NAMES = tuple(_EXTENSIONS) + STEP_QUANTITIES


@dataclasses.dataclass(frozen=True)
class Watch:
    """What ``fit`` computes and how often (``watch(...)`` builds it from ``fit``'s arguments).

    Attributes:
        names: the quantities by name (``NAMES``).
        own: extensions given as instances (a user's, or a built-in one with other settings).
        every: compute on every ``every``-th step (α also on the step after, its end point).
    """

    names: tuple
    own: tuple = ()
    every: int = 1

    def extensions(self, key, start=None) -> tuple[Extension, ...]:
        """The step's extensions.

        Args:
            key: the step's key (for the sampled ones), or ``None``.
            start: the top eigenvector's warm start, shaped like the params, or ``None``.

        Returns:
            The extensions.
        """
        keys = jax.random.split(key, len(self.names) + 1) if key is not None else [None] * (len(self.names) + 1)
        built = tuple(_EXTENSIONS[n](k) for n, k in zip(self.names, keys, strict=False) if n in _EXTENSIONS)
        built = tuple(dataclasses.replace(e, start=start) if isinstance(e, curvature.GGNMaxEigenvalue) and start
                      is not None else e for e in built)
        return built + self.own

    def wants(self, name: str) -> bool:
        """Whether ``name`` is asked for.

        Args:
            name: a quantity's name.

        Returns:
            True or False.
        """
        return name in self.names


def watch(diagnostics, every: int = 1) -> Watch:
    """``fit``'s ``diagnostics`` and ``diagnostics_every`` as a ``Watch``.

    Args:
        diagnostics: ``"economy"``, ``"business"``, ``"full"``, or a list of names (``NAMES``)
            and extension instances.
        every: compute every ``every``-th step (≥ 1).

    Returns:
        The ``Watch``.

    Raises:
        ValueError: an unknown preset or name, or ``every`` below 1.
        TypeError: an entry that is neither a name nor an extension.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"fit: diagnostics_every must be an int >= 1, got {every!r}")
    if isinstance(diagnostics, str):
        if diagnostics not in PRESETS:
            raise ValueError(f"fit: diagnostics must be one of {tuple(PRESETS)} or a list of names from {NAMES}, "
                             f"got {diagnostics!r}")
        return Watch(PRESETS[diagnostics], (), every)
    if not isinstance(diagnostics, Sequence):
        raise TypeError(f"fit: diagnostics must be a preset name or a list, got {type(diagnostics).__name__}")
    names, own = [], []
    for entry in diagnostics:
        if isinstance(entry, str):
            if entry not in NAMES:
                raise ValueError(f"fit: unknown diagnostic {entry!r}; the names are {NAMES}")
            names.append(entry)
        else:
            own.append(entry)
    check_extensions(own + [_EXTENSIONS[n](None) for n in names if n in _EXTENSIONS and n != "ggn_max_eigenvalue"])
    return Watch(tuple(dict.fromkeys(names)), tuple(own), every)


class DiagnosticsState(NamedTuple):
    """The optimizer state with what the diagnostics carry from step to step."""

    inner: Any  # the optimizer's own state
    count: jax.Array  # the steps taken
    init: Any  # the params at the start (for the distance)
    direction: Any  # the last diagnosed step's update (α's end point projects onto it)
    start: jax.Array  # α's start point: (f, var_f, df, var_df, t)
    has_start: jax.Array  # whether the last step recorded a start point
    eigenvector: Any  # the GGN's last top Ritz vector (the next Lanczos' warm start; zeros: none yet)

    @classmethod
    def begin(cls, inner, params) -> DiagnosticsState:
        """The state before the first step."""
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        first = jax.tree_util.tree_leaves(params)[0].dtype if jax.tree_util.tree_leaves(params) else jnp.float32
        return cls(inner, jnp.zeros((), jnp.int32), params, zeros, jnp.zeros((5,), first), jnp.zeros((), bool), zeros)


def watched_update(model, loss, optimizer, settings: Watch):
    """The training step's pass and update with the diagnostics (``fbp.step_pass.optimizer_update``'s
    signature).

    Args:
        model: the model.
        loss: the loss.
        optimizer: the optimizer (its state sits in ``DiagnosticsState.inner``).
        settings: the ``Watch``.

    Returns:
        ``f(params, opt_state, x, y, *, state=None, key=None) -> (value, updates, opt_state,
        pred, new_state, q)`` with ``opt_state`` a ``DiagnosticsState`` and ``q["diagnostics"]``
        the step's results (NaN where it was not due; ``q["due"]`` says, ``q["step"]`` numbers it).
    """

    def full(params, opt_state: DiagnosticsState, x, y, state, key, only_alpha=False):
        key_pass = None if key is None else jax.random.fold_in(key, 7)
        warm = opt_state.eigenvector if settings.wants("ggn_max_eigenvalue") else None
        exts = [] if only_alpha else list(settings.extensions(key_pass, warm))
        exts = check_extensions(exts + ([_Kept()] if settings.wants("alpha") else []))
        value, grads, pred, new_state, q, context = engine.run(model, loss, exts, params, x, y, state=state,
                                                               key=key, with_context=True)
        updates, inner = optimizer.update(grads, opt_state.inner, params)
        out = {e.name: q[e.name] for e in exts if e.name != _Kept.name}
        eigenvector = opt_state.eigenvector
        if isinstance(out.get("ggn_max_eigenvalue"), dict):  # the Ritz vector: the next warm start
            eigenvector = out["ggn_max_eigenvalue"]["vector"]
            out["ggn_max_eigenvalue"] = out["ggn_max_eigenvalue"]["value"]
        out |= _update_quantities(model, settings, context, value, updates, inner, params, opt_state.init)
        start, has_start = opt_state.start, jnp.zeros((), bool)
        if settings.wants("alpha"):
            out["alpha"], start = _alpha_ends(model, context, q[_Kept.name], opt_state, updates)
            has_start = jnp.logical_and(opt_state.count % settings.every == 0, not only_alpha)
        new_state_d = opt_state._replace(inner=inner, count=opt_state.count + 1, direction=updates, start=start,
                                         has_start=has_start, eigenvector=eigenvector)
        return value, updates, new_state_d, pred, new_state, out

    def plain(params, opt_state: DiagnosticsState, x, y, state, key):
        value, grads, pred, new_state = value_grad_and_output(model, loss, params, x, y, state=state, key=key)
        updates, inner = optimizer.update(grads, opt_state.inner, params)
        return value, updates, opt_state._replace(inner=inner, count=opt_state.count + 1,
                                                  has_start=jnp.zeros((), bool)), pred, new_state

    def f(params, opt_state, x, y, *, state=None, key=None):
        shapes = jax.eval_shape(lambda: full(params, opt_state, x, y, state, key))[5]

        def nan(names=()):
            return {k: jax.tree_util.tree_map(lambda a: jnp.full(a.shape, jnp.nan, a.dtype) if jnp.issubdtype(
                a.dtype, jnp.inexact) else jnp.zeros(a.shape, a.dtype), v) for k, v in shapes.items() if k not in names}

        def between():
            return (*plain(params, opt_state, x, y, state, key), nan())

        def alpha_end():  # the step after a diagnosed one: only α's end point (projections onto the last update)
            value, updates, o, pred, new_state, out = full(params, opt_state, x, y, state, key, only_alpha=True)
            return value, updates, o, pred, new_state, nan(("alpha",)) | {"alpha": out["alpha"]}

        phase = opt_state.count % settings.every
        branches = [lambda: full(params, opt_state, x, y, state, key), between]
        branch = jnp.where(phase == 0, 0, 1)
        if settings.wants("alpha") and settings.every > 1:
            branches.insert(1, alpha_end)
            branch = jnp.where(phase == 0, 0, jnp.where(phase == 1, 1, 2))
        value, updates, opt_state, pred, new_state, out = jax.lax.switch(branch, branches)
        return value, updates, opt_state, pred, new_state, {"diagnostics": out, "due": branch < len(branches) - 1,
                                                            "step": opt_state.count - 1}

    return f


@dataclasses.dataclass(frozen=True)
class _Kept(Extension):
    """What α's projections onto the update read after it (``fbp.probes.project``)."""

    name: ClassVar[str] = "alpha_projections"
    needs: ClassVar[str] = "project"


def _update_quantities(model, settings, context, value, updates, inner, params, init) -> dict:
    """The step's own numbers: its batch and learning rate (the findings read them), the loss,
    the update's size and ratio, the distance from the start."""
    out = {"batch": jnp.asarray(context.batch, jnp.int32)}
    rate = learning_rate(inner, default=None)
    if rate is not None:
        out["learning_rate"] = jnp.asarray(rate, jnp.float32)
    if settings.wants("loss"):
        out["loss"] = value
    if settings.wants("update_size"):
        out["update_size"] = step.update_size(model, updates)
    if settings.wants("update_ratio"):
        out["update_ratio"] = step.update_ratio(model, updates, params)
    if settings.wants("distance"):
        out["distance"] = step.distance(model, apply_updates(params, updates), init)
    return out


def _alpha_ends(model, context, kept, opt_state, updates):
    """α of the previous step (its end point is this pass) and this step's start point."""
    c = context.batch * context.scale  # u_b = c ℓ_b: their mean is the reduced loss
    losses = c * jnp.sum(context.values.reshape(context.batch, -1), axis=1)

    def point(direction):
        t = _length(direction)
        return step.point(losses, c * moments.projections(kept, moments.by_leaf(model, direction), model) / _safe(t)), t

    end, _ = point(opt_state.direction)
    s0 = opt_state.start
    alpha = jnp.where(opt_state.has_start, step.alpha(step.Point(s0[0], s0[1], s0[2], s0[3]), end, s0[4]), jnp.nan)
    here, t = point(updates)
    return alpha, jnp.stack([here.f, here.var_f, here.df, here.var_df, t]).astype(s0.dtype)


def _length(tree):
    return jnp.sqrt(sum((jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)), jnp.zeros(())))


def _safe(t):
    return jnp.where(t > 0, t, 1.0)
