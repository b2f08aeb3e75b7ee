"""What ``fit`` carries from one epoch to the next, and how a run is checkpointed and resumed.

Everything that decides the rest of a run is in ``LoopState``: params, model state and
optimizer state (and the last finite copy of them), the epochs completed, the history, the
telemetry history, early stopping's best value, epoch, params, state and patience count, and
why training stopped, if it did. The randomness is not carried: every epoch's shuffle and
every step's dropout key are derived from ``fit``'s ``key`` and the epoch number
(``fold_in``), so a run resumed from epoch ``e`` draws exactly what the uninterrupted run drew.
That is why a resumed run ends **bit-identical** to one that never stopped, and why the key is
stored with the checkpoint and checked on resume.

Histories are stored as JSON text inside the checkpoint (exact: Python writes the shortest
repr that reads back to the same float, NaN included).

**A resume continues the same run, or refuses.** Beside the loop state every checkpoint keeps
the run's *signature* (``signature``): the training set's size, the batch size, shuffling,
the validation set's size, the telemetry statistics, the privacy and precision settings, and
the optimizer's first update on a fixed probe gradient (which a changed learning rate, clipping
norm, weight decay or schedule start changes). ``fit(resume=True)`` with a different signature
raises ``ValueError`` naming every difference, because the continued run would no longer be the
one that was checkpointed (the history and telemetry would mix two runs, the epoch count would
mean something else). Only ``epochs`` may change: raise it to train longer. To continue from the
weights with other settings, start a new run (another ``checkpoint_dir``) from the restored
params.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp import checkpoint, checkpoint_shards

NO_DIVERGENCE = {"initial": None, "lowest": None, "lowest_epoch": None, "at": None}
_PROBE_RTOL = 1e-5  # the optimizer probe is compared with this tolerance (the arithmetic may differ by backend)


def signature(optimizer, params, *, n: int, batch_size, shuffle: bool, validation: int | None, telemetry,
              privacy, precision, diagnostics=None) -> dict:
    """What must stay the same for a run to be resumed (module docstring).

    Args:
        optimizer: the ``GradientTransformation``; probed once: its first update from
            ``init(zeros)`` for the gradient ``0.5`` everywhere, summed per leaf.
        params: the params (only shapes and dtypes are read).
        n: the training set's size.
        batch_size: ``fit``'s batch size.
        shuffle: ``fit``'s shuffle flag.
        validation: the validation set's size, or ``None``.
        telemetry: ``fit``'s telemetry setting.
        privacy: the ``DPSGD`` settings, or ``None``.
        precision: the precision policy, or ``None``.
        diagnostics: the ``fbp.diagnostics.Watch``, or ``None`` (absent from older checkpoints: none).

    Returns:
        A JSON-able dict.
    """
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    probe = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.5) if jnp.issubdtype(a.dtype, jnp.inexact) else a,
                                   zeros)
    updates, _ = optimizer.update(probe, optimizer.init(zeros), zeros)
    sums = [float(jnp.sum(u.astype(jnp.float32))) for u in jax.tree_util.tree_leaves(updates)]
    return {"training examples": int(n), "batch_size": batch_size, "shuffle": bool(shuffle),
            "validation examples": validation,
            "telemetry": telemetry if isinstance(telemetry, bool) else list(telemetry),
            "privacy": None if privacy is None else repr(privacy),
            "precision": None if precision is None else repr(_policy(precision)), "optimizer probe": sums} | \
        ({} if diagnostics is None else {"diagnostics": repr(diagnostics)})


def _policy(precision):
    from fbp.precision import Policy  # the text form ("bfloat16") and its Policy are one setting

    return Policy.parse(precision) if isinstance(precision, str) else precision


def _differences(saved: dict, now: dict) -> list[str]:
    found = []
    for name in sorted(set(saved) | set(now)):
        a, b = saved.get(name), now.get(name)
        if name == "optimizer probe" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and \
                np.allclose(a, b, rtol=_PROBE_RTOL, atol=0):
            continue
        if a != b:
            what = ("the optimizer's first update on a probe gradient (a changed learning rate, clipping, "
                    "weight decay or schedule)") if name == "optimizer probe" else name
            found.append(f"{what}: {_short(a)} in the checkpointed run, {_short(b)} now")
    return found


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclasses.dataclass
class LoopState:
    """``fit``'s state between epochs (module docstring).

    Attributes:
        carry: ``(params, model state, optimizer state)``.
        good: the last carry that ended an epoch with everything finite.
        best_params: early stopping's best params.
        best_state: the model state that went with them.
        history: ``{metric: [per-epoch values]}``.
        stat_history: the telemetry history, ``{path: {name: [per-epoch values]}}``.
        best: the best monitored value so far.
        best_epoch: the epoch it was reached.
        waited: epochs since the last improvement.
        epoch: epochs completed.
        stop_reason: why training ended early, if it did.
        divergence: ``{"initial": the loss before the first update, "lowest": the lowest epoch
            loss, "lowest_epoch": its epoch, "at": the epoch divergence was found, or None}``.
    """

    carry: tuple  # (params, model state, optimizer state)
    good: tuple  # the last carry that ended an epoch with everything finite
    best_params: Any
    best_state: Any
    history: dict = dataclasses.field(default_factory=dict)
    stat_history: dict = dataclasses.field(default_factory=dict)
    best: float | None = None
    best_epoch: int | None = None
    waited: int = 0
    epoch: int = 0  # epochs completed
    stop_reason: str | None = None  # why training ended early, if it did
    divergence: dict = dataclasses.field(default_factory=lambda: dict(NO_DIVERGENCE))  # what divergence is judged by

    @classmethod
    def start(cls, params, state, opt_state) -> LoopState:
        carry = (params, state, opt_state)
        return cls(carry=carry, good=carry, best_params=params, best_state=state)

    def tree(self, key) -> dict:
        params, state, opt_state = self.carry
        return {"epoch": self.epoch, "stop_reason": self.stop_reason, "key": _key_data(key),
                "carry": {"params": params, "state": state, "opt_state": opt_state},
                "good": {"params": self.good[0], "state": self.good[1], "opt_state": self.good[2]},
                "best": {"value": None if self.best is None else float(self.best), "epoch": self.best_epoch,
                         "waited": self.waited, "params": self.best_params, "state": self.best_state},
                "history": json.dumps(self.history), "telemetry": json.dumps(self.stat_history),
                "divergence": dict(self.divergence)}

    @classmethod
    def from_tree(cls, tree: dict) -> LoopState:
        c, g, b = tree["carry"], tree["good"], tree["best"]
        return cls(carry=(c["params"], c["state"], c["opt_state"]), good=(g["params"], g["state"], g["opt_state"]),
                   best_params=b["params"], best_state=b["state"], history=json.loads(tree["history"]),
                   stat_history=json.loads(tree["telemetry"]), best=b["value"], best_epoch=b["epoch"],
                   waited=b["waited"], epoch=tree["epoch"], stop_reason=tree["stop_reason"],
                   divergence=dict(tree.get("divergence", NO_DIVERGENCE)))


def _key_data(key) -> np.ndarray:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)


def _on_device(tree, like):
    """Restored NumPy arrays as JAX arrays of the same dtype, laid out as ``like``'s leaves where
    those span several processes (``fbp.checkpoint_shards.place_like``); plain values stay."""
    return checkpoint_shards.place_like(tree, like)


def prepare(directory, loop: LoopState, key, resume: bool, run: dict | None = None) -> LoopState:
    """The loop state to start ``fit`` from.

    Refuses to start a fresh run over existing checkpoints, which it would otherwise overwrite.

    Args:
        directory: the checkpoint directory.
        loop: the fresh run's loop state.
        key: ``fit``'s key (a resumed run must use the same one).
        resume: continue from the newest checkpoint if there is one.
        run: this run's ``signature`` (checked against the checkpoint's; ``None`` skips it).

    Returns:
        ``loop`` itself for a fresh run (or when ``directory`` holds no checkpoint), else the
        newest checkpoint's loop state, on the devices ``loop`` is on.

    Raises:
        ValueError: checkpoints exist and ``resume`` is false, or the key or the signature differs
            from the checkpointed run's.
    """
    latest = checkpoint.latest_step(directory)
    if latest is None:
        return loop
    if not resume:
        raise ValueError(f"fit: checkpoint_dir {os.fspath(directory)!r} already holds checkpoints (the newest after "
                         f"epoch {latest}); pass resume=True to continue that run, or choose another directory")
    target = loop.tree(key)
    saved = {path.split("/")[0] for path in checkpoint.saved_paths(directory, latest)}
    has_run = "run" in saved
    if has_run:
        target["run"] = ""
    if "divergence" not in saved:
        target.pop("divergence")
    restored = checkpoint.restore(directory, target, latest)
    if not np.array_equal(restored["key"], target["key"]):
        raise ValueError("fit: resume=True with a different key than the checkpointed run; the shuffles and dropout "
                         "keys would differ, so the run could not continue exactly. Pass the original key")
    if has_run and run is not None:
        differences = _differences(json.loads(restored.pop("run")), json.loads(json.dumps(run)))
        if differences:
            raise ValueError(f"fit: resume=True, but this run differs from the one checkpointed in "
                             f"{os.fspath(directory)!r} (after epoch {latest}): " + "; ".join(differences) +
                             ". Pass the original settings to continue it (only epochs may change), or start a new "
                             "run in another checkpoint_dir")
    restored.pop("run", None)
    target.pop("run", None)
    return LoopState.from_tree(_on_device(restored, target))


def save(directory, loop: LoopState, key, keep: int | None, run: dict | None = None) -> None:
    """Save the loop state after an epoch, as checkpoint number ``loop.epoch``.

    Args:
        directory: the checkpoint directory.
        loop: the loop state.
        key: ``fit``'s key, saved so a resume can check it.
        keep: how many checkpoints to keep (``None``: all).
        run: the run's ``signature``, stored for ``prepare`` to check.

    Returns:
        ``None``.
    """
    tree = loop.tree(key)
    if run is not None:
        tree["run"] = json.dumps(run)
    checkpoint.save(directory, tree, loop.epoch, keep=keep)
