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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp import checkpoint


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
                "history": json.dumps(self.history), "telemetry": json.dumps(self.stat_history)}

    @classmethod
    def from_tree(cls, tree: dict) -> LoopState:
        c, g, b = tree["carry"], tree["good"], tree["best"]
        return cls(carry=(c["params"], c["state"], c["opt_state"]), good=(g["params"], g["state"], g["opt_state"]),
                   best_params=b["params"], best_state=b["state"], history=json.loads(tree["history"]),
                   stat_history=json.loads(tree["telemetry"]), best=b["value"], best_epoch=b["epoch"],
                   waited=b["waited"], epoch=tree["epoch"], stop_reason=tree["stop_reason"])


def _key_data(key) -> np.ndarray:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    return np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)


def _on_device(tree, like):
    """Restored NumPy arrays as JAX arrays of the same dtype (plain values stay as they are)."""
    return jax.tree_util.tree_map(lambda a, _: jnp.asarray(a) if isinstance(a, np.ndarray) else a, tree, like,
                                  is_leaf=lambda a: a is None)


def prepare(directory, loop: LoopState, key, resume: bool) -> LoopState:
    """The loop state to start ``fit`` from.

    Refuses to start a fresh run over existing checkpoints, which it would otherwise overwrite.

    Args:
        directory: the checkpoint directory.
        loop: the fresh run's loop state.
        key: ``fit``'s key (a resumed run must use the same one).
        resume: continue from the newest checkpoint if there is one.

    Returns:
        ``loop`` itself for a fresh run (or when ``directory`` holds no checkpoint), else the
        newest checkpoint's loop state, on the devices ``loop`` is on.

    Raises:
        ValueError: checkpoints exist and ``resume`` is false, or the key differs from the
            checkpointed run's.
    """
    latest = checkpoint.latest_step(directory)
    if latest is None:
        return loop
    if not resume:
        raise ValueError(f"fit: checkpoint_dir {os.fspath(directory)!r} already holds checkpoints (the newest after "
                         f"epoch {latest}); pass resume=True to continue that run, or choose another directory")
    target = loop.tree(key)
    restored = checkpoint.restore(directory, target, latest)
    if not np.array_equal(restored["key"], target["key"]):
        raise ValueError("fit: resume=True with a different key than the checkpointed run; the shuffles and dropout "
                         "keys would differ, so the run could not continue exactly. Pass the original key")
    return LoopState.from_tree(_on_device(restored, target))


def save(directory, loop: LoopState, key, keep: int | None) -> None:
    """Save the loop state after an epoch, as checkpoint number ``loop.epoch``.

    Args:
        directory: the checkpoint directory.
        loop: the loop state.
        key: ``fit``'s key, saved so a resume can check it.
        keep: how many checkpoints to keep (``None``: all).

    Returns:
        ``None``.
    """
    checkpoint.save(directory, loop.tree(key), loop.epoch, keep=keep)
