"""Does a layer treat the examples of a batch independently? Declared, or measured once.

Per-example gradients, their norms, clipping and DP-SGD's sensitivity bound all rest on one
property of every leaf layer: example ``b``'s output depends on example ``b``'s input only
(and on params, state and key), never on the other examples of the batch. ``x - x.mean(0)``
or any statistic over the batch breaks it — per-example gradients are then not the gradients
of each example's loss, and an ε computed for clipped gradients would be false.

**Declared.** A layer class states it beside its forward: ``independent_examples = True``
(every built-in that keeps examples apart), or ``examples_independent(train)`` where it
depends on the mode (BatchNorm: only in evaluation). A declaration counts only for the class
that writes the forward it describes: a subclass that overrides ``forward`` (or a
``ParameterFree``'s ``_forward``) without declaring again is *undeclared*, so inheriting
from ``Dense`` cannot smuggle a batch-mixing forward past the check.

**Measured** (undeclared layers — a user's own). Before any per-example or private
computation the layer runs, once per input signature and mode, on a concrete random batch
of four examples with two sets of parameters (its ``init`` and the same plus noise, so a
mixing term initialised at zero still shows); each example in turn is replaced by another
random one (and its output cotangent with it), and no *other* example's output — nor the
input cotangent its backward returns — may move by more than ``1e-5`` of that output's
scale (a hook that normalises the cotangent over the whole batch mixes examples in its
backward). A layer whose output has another batch size is mixing by definition. A dependency that
shows only at particular parameter values can escape a random probe: declare such a layer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROBE_BATCH = 4
TOLERANCE = 1e-5  # relative to the output's largest entry
_FORWARD = ("forward", "_forward")
_DECLARATIONS = ("independent_examples", "examples_independent")


def declared(layer, train: bool) -> bool | None:
    """What ``layer``'s class declares for this mode: ``True``, ``False`` or ``None`` (nothing,
    or a declaration above a forward that a subclass replaced).

    Args:
        layer: a leaf layer.
        train: training mode.

    Returns:
        The declaration, or ``None``.
    """
    mro = type(layer).__mro__
    writes_forward = next((i for i, c in enumerate(mro) if any(n in c.__dict__ for n in _FORWARD)), len(mro))
    declares = next((i for i, c in enumerate(mro) if any(n in c.__dict__ for n in _DECLARATIONS)), len(mro))
    if declares > writes_forward:
        return None
    return layer.examples_independent(train)


def measured(layer, x, *, train: bool) -> tuple[bool, str]:
    """Measure whether ``layer`` keeps the examples of a batch apart (module docstring).

    Args:
        layer: a leaf layer.
        x: an input batch or its ``ShapeDtypeStruct`` (only shapes and dtypes are read).
        train: training mode.

    Returns:
        ``(independent, what was seen)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(x)
    signature = (treedef, tuple((tuple(a.shape[1:]), jnp.dtype(a.dtype).name) for a in leaves), bool(train))
    try:
        return _measured_cached(layer, signature)
    except TypeError:  # an unhashable layer: measured every time it is traced
        return _measure(layer, signature)


@functools.lru_cache(maxsize=256)
def _measured_cached(layer, signature):
    return _measure(layer, signature)


def _draw(rng, shape, dtype):
    """A NumPy array of ``shape``: standard normal for floating dtypes, 0/1 for integers and bools."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.inexact):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, shape).astype(dtype)


def _measure(layer, signature) -> tuple[bool, str]:
    from fbp.core import run_forward

    treedef, shapes, train = signature
    b = PROBE_BATCH
    rng = np.random.default_rng(20261204)  # NumPy draws: nothing to compile for the probe's inputs
    base = [_draw(rng, (b, *s), d) for s, d in shapes]
    other = [_draw(rng, (b, *s), d) for s, d in shapes]

    def forward(params, x):
        context = {"state": layer.init_state(params) if layer.has_state else None,
                   "key": jax.random.key(1) if layer.needs_key else None, "train": train}
        return run_forward(layer, params, x, **context)

    def seen(params, x, d_y):  # the outputs and the input cotangents of one batch
        y, res = forward(params, x)
        return _outputs(y) + _outputs(layer.backward(res, d_y)[1])

    with jax.ensure_compile_time_eval():
        x = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in base])
        params = layer.init(jax.random.key(20261204), x)
        noisy = jax.tree_util.tree_map(lambda p: p + jnp.asarray(0.5 * rng.standard_normal(p.shape), p.dtype)
                                       if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        y = jax.eval_shape(forward, params, x)[0]
        outs = _outputs(y)
        if any(tuple(a.shape)[:1] != (b,) for a in outs):
            return False, f"an input batch of {b} gave outputs of shapes {[tuple(a.shape) for a in outs]}"
        d_y0 = jax.tree_util.tree_map(lambda a: _draw(rng, a.shape, a.dtype), y)
        d_y1 = jax.tree_util.tree_map(lambda a: _draw(rng, a.shape, a.dtype), y)
        # variant 0: the batch as drawn; variant i+1: example i (and its output cotangent) replaced
        variants = functools.partial(_variants, b)
        xs = jax.tree_util.tree_unflatten(treedef, [variants(u, v) for u, v in zip(base, other, strict=True)])
        d_ys = jax.tree_util.tree_map(variants, d_y0, d_y1)
        each = jax.jit(jax.vmap(seen, in_axes=(None, 0, 0)))
        for trial in (params, noisy):
            for n, a in enumerate(each(trial, xs, d_ys)):
                a = np.asarray(a, np.float64)
                finite = a[0][np.isfinite(a[0])]
                scale = float(np.max(np.abs(finite), initial=0.0)) + 1.0
                for i in range(b):
                    j, worst = _moved(a[0], a[i + 1], i)
                    if worst > TOLERANCE * scale:
                        what = "output" if n < len(outs) else "input cotangent (from its backward)"
                        return False, (f"replacing example {i} of a random batch of {b} moved example {j}'s "
                                       f"{what} by {worst:.3g}")
    return True, f"no example's output moved when another changed (random batch of {b})"


def _moved(before, after, i):
    """``(j, how far)``: the other example whose entries moved most when example ``i`` was
    replaced. Entries that are NaN/inf in both runs at the same place (a layer's own NaN for
    some inputs) do not count; one that becomes or stops being non-finite counts as infinitely far."""
    keep = np.delete(np.arange(before.shape[0]), i)
    u, v = before[keep].reshape(len(keep), -1), after[keep].reshape(len(keep), -1)
    same = (u == v) | (np.isnan(u) & np.isnan(v))
    gap = np.where(same, 0.0, np.abs(u - v))
    gap = np.where(np.isnan(gap), np.inf, gap)
    per_example = gap.max(axis=1, initial=0.0)
    k = int(np.argmax(per_example))
    return int(keep[k]), float(per_example[k])


def _variants(b, u, v):
    """``(b + 1, b, ...)``: ``u``, then ``u`` with row ``i`` taken from ``v`` for each ``i`` (NumPy)."""
    out = np.repeat(np.asarray(u)[None], b + 1, axis=0)
    for i in range(b):
        out[i + 1, i] = np.asarray(v)[i]
    return out


def _outputs(y) -> list[Any]:
    """The floating leaves of ``y`` with a batch axis (integer and ``float0`` cotangents carry nothing)."""
    return [a for a in jax.tree_util.tree_leaves(y) if hasattr(a, "shape") and np.ndim(a) >
            0 and jnp.issubdtype(a.dtype, jnp.inexact)]


def require(layer, x, *, train: bool, caller: str, path: str = "") -> None:
    """Refuse a leaf layer that mixes the examples of a batch (declared, or measured when undeclared).

    Args:
        layer: a leaf layer.
        x: its input (a tracer is fine: only shapes and dtypes are read).
        train: training mode.
        path: the layer's path in the model (leave it empty inside a combinator's forward,
            whose ``at_path`` adds it).
        caller: what needs the property (``"per-example gradients"``), for the message.

    Raises:
        InputError: the layer mixes the batch, naming its path and how that was found.
    """
    from fbp.validation import InputError

    verdict = declared(layer, train)
    if verdict is None:
        verdict, seen = measured(layer, x, train=train)
        how = f"measured: {seen}"
    else:
        how = "declared by its class"
    if verdict:
        return
    mode = "training" if train else "evaluation"
    advice = (" (its statistics are the batch's); use GroupNorm or LayerNorm, or train=False" if
              type(layer).__name__ == "BatchNorm" else
              "; make it treat each example on its own, or if it does, declare independent_examples = True on its "
              "class")
    raise InputError(repr(layer), f"mixes the examples of a batch in {mode} mode ({how}), so {caller} would be "
                                  f"wrong (per-example gradients, clipped sums and a privacy guarantee all assume "
                                  f"each example's gradient is its own){advice}",
                     path=tuple(path.split("/")) if path else ())
