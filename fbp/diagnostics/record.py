"""``fit``'s book-keeping for the diagnostics: the per-step buffer the jitted epoch fills, the
host-side record ``{step: {quantity: value}}``, and its JSON-lines file beside the checkpoints.

Inside an epoch (one ``lax.scan``) every step writes its results into row ``i`` of a buffer in
the carry; after the epoch the rows of the diagnosed steps become the record. α of step ``s``
is known one step later (its end point is the next batch), so it is recorded under ``s`` when
step ``s + 1`` runs; in the file that is an extra line ``{"step": s, "alpha": …}`` — lines
with one step merge. The file is append-only; on resume, lines of steps the checkpoint had not
reached are dropped before training continues, so the file always matches the run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

FILE = "diagnostics.jsonl"


def zero_buffer(shapes, steps: int) -> dict:
    """The epoch's buffer: ``steps`` rows of each result (NaN), the due flags and step numbers.

    Args:
        shapes: ``q`` of the watched update (``jax.eval_shape``): ``{"diagnostics", "due", "step"}``.
        steps: the epoch's number of steps.

    Returns:
        The buffer, a pytree of arrays.
    """
    def rows(s):
        fill = jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact) else 0
        return jnp.full((steps, *s.shape), fill, s.dtype)

    return jax.tree_util.tree_map(rows, {k: shapes[k] for k in ("diagnostics", "due", "step")})


def write(buffer: dict, row, q: dict) -> dict:
    """The buffer with one row set to this step's results (a per-example result of a smaller
    last batch padded with NaN to the buffer's batch).

    Args:
        buffer: the epoch's buffer (``zero_buffer``).
        row: the step's row (its index in the epoch).
        q: the watched update's ``q``.

    Returns:
        The new buffer.
    """
    def put(b, v):
        if v.shape != b.shape[1:]:  # a per-example result of the epoch's last, smaller batch: NaN-padded
            v = jnp.pad(v.astype(b.dtype), [(0, b.shape[1] - v.shape[0])] + [(0, 0)] * (v.ndim - 1),
                        constant_values=jnp.nan)
        return b.at[row].set(v.astype(b.dtype))

    return jax.tree_util.tree_map(put, buffer, {k: q[k] for k in ("diagnostics", "due", "step")})


def _python(tree):
    if isinstance(tree, dict):
        return {k: _python(v) for k, v in tree.items()}
    a = np.asarray(tree)
    if a.ndim:
        return a
    return int(a) if np.issubdtype(a.dtype, np.integer) else float(a)


def record_epoch(record: dict, buffer, every: int) -> list[dict]:
    """Move the epoch's diagnosed steps from the buffer into ``record``.

    Args:
        record: ``{step: {quantity: value}}``, updated in place.
        buffer: the epoch's buffer after its last step.
        every: ``fit``'s ``diagnostics_every``.

    Returns:
        The new lines for the JSON-lines file (a step's results; α of the step before).
    """
    host = jax.device_get(buffer)
    lines = []
    for i in np.flatnonzero(host["due"]):
        s = int(host["step"][i])
        values = _python(jax.tree_util.tree_map(lambda a, i=i: a[i], host["diagnostics"]))
        late = values.pop("alpha", None)
        if late is not None and math.isfinite(late) and (s - 1) in record:
            record[s - 1]["alpha"] = late
            lines.append({"step": s - 1, "alpha": late})
        if s % every == 0:
            record[s] = values
            lines.append({"step": s} | values)
    return lines


def _jsonable(tree):
    if isinstance(tree, dict):
        return {k: _jsonable(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return [None if isinstance(v, float) and not math.isfinite(v) else v for v in tree.ravel().tolist()] \
            if tree.ndim == 1 else [_jsonable(row) for row in tree]
    return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def append(directory, lines: list[dict]) -> None:
    """Append lines to ``directory/diagnostics.jsonl``, flushed and synced (it is written
    before the checkpoint that follows it).

    Args:
        directory: the checkpoint directory.
        lines: the lines (``record_epoch``).

    Returns:
        None.
    """
    if not lines or jax.process_index() != 0:  # several processes: the first one writes the record
        return
    path = pathlib.Path(directory) / FILE
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(_jsonable(line)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load(directory, before: int) -> dict:
    """The record of the steps before ``before`` from ``directory/diagnostics.jsonl``, the
    file rewritten (atomically) to hold only them.

    Args:
        directory: the checkpoint directory.
        before: the first step the resumed run will take.

    Returns:
        ``{step: {quantity: value}}`` (lists for histograms, ``None`` for NaN).
    """
    path = pathlib.Path(directory) / FILE
    if not path.exists():
        return {}
    kept, record = [], {}
    for text in path.read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        if line["step"] < before and not (line.get("alpha") is not None and line["step"] + 1 >= before
                                          and len(line) == 2):
            kept.append(text)
            record.setdefault(line["step"], {}).update({k: v for k, v in line.items() if k != "step"})
    if jax.process_index() == 0:  # several processes: the first one rewrites the record
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(t + "\n" for t in kept), encoding="utf-8")
        os.replace(tmp, path)
    return record


_SHAPES: dict = {}


def buffer_for(model, loss, optimizer, watched, trees, x, y, full, rest, mesh=None) -> dict:
    """The epoch's zero buffer for ``fit`` (its result shapes traced once per setting).

    Args:
        model: the model.
        loss: the loss.
        optimizer: the optimizer (its state is wrapped in a ``DiagnosticsState``).
        watched: the ``Watch``.
        trees: ``(params, state, opt_state)`` at the epoch's start.
        x: the training inputs.
        y: the training targets.
        full: the epoch's full batches' indices ``(steps, batch)``.
        rest: the last, smaller batch's indices, or ``None``.
        mesh: the device mesh, or ``None`` (then the buffer is replicated on it).

    Returns:
        The buffer (``zero_buffer``).
    """
    from fbp import parallel
    from fbp.diagnostics.training import watched_update

    params, state, opt_state = trees
    b = full.shape[1]

    def shapes():
        update = watched_update(model, loss, optimizer, watched)
        return jax.eval_shape(lambda p, o, xb, yb, s: update(p, o, xb, yb, state=s, key=jax.random.PRNGKey(0))[5],
                              params, opt_state, x[:b], y[:b], state)

    try:
        key = (model, loss, optimizer, watched, b, jax.tree_util.tree_structure(params))
        found = _SHAPES[key] if key in _SHAPES else _SHAPES.setdefault(key, shapes())
    except TypeError:  # an unhashable user layer
        found = shapes()
    buffer = zero_buffer(found, full.shape[0] + (rest is not None))
    return buffer if mesh is None else parallel.place(buffer, parallel.replicated(mesh))
