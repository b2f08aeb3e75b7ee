"""Checkpoints of a run spread over several processes: each process writes its own shards.

When JAX runs as several processes (``jax.distributed.initialize``), a global array lives in
pieces on every process's devices, and no process can read the others' pieces.
``fbp.checkpoint.save`` then writes the step as

* ``shards-00000.npz``, ``shards-00001.npz``, …: each process's file holds the pieces of every
  sharded array that its devices hold **as replica 0** (``Shard.replica_id``: once per distinct
  piece), and every ``count``-th of the leaves each process holds whole (replicated arrays,
  NumPy arrays, keys: leaf ``i`` by process ``i mod count``, so the processes share the
  writing of a data-parallel run's replicated state); plain values go into the manifest;
* ``shards-00000.json``, …: each file's pieces (leaf, member, global index) and SHA-256;
* ``manifest.json`` — as in one process, each array entry listing its ``pieces``
  (``{"file", "name", "index": [[start, stop], ...]}``) instead of one member of
  ``arrays.npz``, with every shard file's SHA-256 and the process count.

**Atomic across processes.** Every process writes into one temporary sibling directory
(``.tmp-step_<n>-shards``, made by process 0); after a barrier (``sync_global_devices``: every
file is written and fsynced), process 0 checks that the pieces of every array cover it exactly,
writes the manifest and makes the step appear with one ``rename`` (under the directory's lock,
then retention, as in one process); a last barrier keeps every process from reading the
directory before that. A process killed at any point before the rename leaves only the
temporary directory (removed by the next save), never a step that ``latest_step`` lists.
The directory must be one file system that every process sees (a shared disk, as on any
cluster), and one multi-process run writes into it at a time.

**Restores on any process count.** ``fbp.checkpoint.restore`` assembles each array from its
pieces (checked against their files' SHA-256 first), so a checkpoint written by 2 processes
restores on 1, and on 2; ``place_like`` lays restored arrays out as the target's leaves are
(``jax.make_array_from_callback``: each process copies only what its devices hold).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fbp import checkpoint_io

_SHARDS = "shards-{:05d}"


def _index(shard_index, shape) -> list:
    """A shard's global index as ``[[start, stop], ...]`` per dimension."""
    return [[s.start or 0, n if s.stop is None else s.stop] for s, n in zip(shard_index, shape, strict=True)]


def _pieces(leaf, i: int) -> list[tuple[np.ndarray, list]]:
    """``[(data, index)]``: the pieces of leaf number ``i`` this process writes — replica 0 of
    each piece; a leaf every process holds whole (replicated, or a host array) by process
    ``i mod count``, so the processes share the writing of a data-parallel run's state."""
    me, count = jax.process_index(), jax.process_count()
    whole = [[0, n] for n in np.shape(leaf)]
    if isinstance(leaf, jax.Array) and not leaf.is_fully_replicated:
        return [(np.asarray(s.data), _index(s.index, leaf.shape)) for s in leaf.addressable_shards
                if s.replica_id == 0]
    if i % count != me:
        return []
    return [(np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf), whole)]


def remove_leftovers(directory: str) -> None:
    """Remove what a multi-process save killed before its rename left (``.tmp-step_*-shards``).

    Args:
        directory: the checkpoint directory.

    Returns:
        None.
    """
    for stale in glob.glob(os.path.join(directory, ".tmp-step_*-shards")):
        shutil.rmtree(stale, ignore_errors=True)


def _sync(name: str) -> None:
    multihost_utils.sync_global_devices(f"fbp.checkpoint: {name}")


def save(directory: str, entries: list[dict], leaves: list, step: int, commit) -> str:
    """Write one step from every process (module docstring); called by ``fbp.checkpoint.save``
    on every process with the same arguments.

    Args:
        directory: the checkpoint directory (exists).
        entries: the manifest's entries, one per leaf (plain values complete; arrays and keys
            without their data).
        leaves: per entry, the array (for keys: the key data) or ``None`` for a plain value.
        step: the step.
        commit: ``commit(tmp, manifest) -> final path`` (process 0: manifest, rename, retention).

    Returns:
        The step's directory.
    """
    me, count = jax.process_index(), jax.process_count()
    tmp = os.path.join(directory, f".tmp-step_{int(step):08d}-shards")
    _sync(f"step {step}: begin")
    if me == 0:
        remove_leftovers(directory)
        os.makedirs(tmp)
    _sync(f"step {step}: directory made")
    name = _SHARDS.format(me)
    arrays, listed = {}, []
    for i, leaf in enumerate(leaves):
        if leaf is None:
            continue
        for k, (data, index) in enumerate(_pieces(leaf, i)):
            member = f"a{i}_{k}"
            arrays[member] = checkpoint_io.storable(data)
            listed.append({"leaf": i, "name": member, "index": index})
    with open(os.path.join(tmp, name + ".npz"), "wb") as f:
        digest = checkpoint_io.write_npz(f, arrays)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, name + ".json"), "w") as f:
        json.dump({"pieces": listed, "sha256": digest}, f)
        f.flush()
        os.fsync(f.fileno())
    _sync(f"step {step}: shards written")
    final = None
    if me == 0:
        files = {}
        for entry in entries:
            if entry["kind"] != "value":
                entry["pieces"] = []
        for p in range(count):
            with open(os.path.join(tmp, _SHARDS.format(p) + ".json")) as f:
                own = json.load(f)
            files[_SHARDS.format(p) + ".npz"] = own["sha256"]
            for piece in own["pieces"]:
                entries[piece["leaf"]]["pieces"].append({"file": _SHARDS.format(p) + ".npz", "name": piece["name"],
                                                         "index": piece["index"]})
        for entry in entries:
            if entry["kind"] != "value":
                _require_cover(entry)
        final = commit(tmp, {"leaves": entries, "sha256": files, "processes": count})
    _sync(f"step {step}: committed")
    return final or os.path.join(directory, f"step_{int(step):08d}")


def _require_cover(entry: dict) -> None:
    """The pieces of an array leaf tile it: their sizes add up to its size and none overlaps."""
    shape, pieces = entry.get("data_shape", entry["shape"]), [p["index"] for p in entry["pieces"]]
    for i, a in enumerate(pieces):
        for b in pieces[:i]:
            if all(max(x[0], y[0]) < min(x[1], y[1]) for x, y in zip(a, b, strict=True)):
                raise RuntimeError(f"fbp.checkpoint: two processes wrote the same piece of {entry['path']!r}")
    if sum(int(np.prod([hi - lo for lo, hi in index])) for index in pieces) != int(np.prod(shape)):
        raise RuntimeError(f"fbp.checkpoint: no process wrote part of {entry['path']!r} (shape {shape}); the "
                           f"step is not committed")


def assemble(entry: dict, files: dict) -> np.ndarray:
    """One array leaf of a multi-process checkpoint, whole, from its pieces.

    Args:
        entry: the leaf's manifest entry (with ``pieces``).
        files: ``{file name: opened npz}``.

    Returns:
        The stored array (in its stored dtype; ``fbp.checkpoint`` views it back).
    """
    out = None
    for piece in entry["pieces"]:
        data = files[piece["file"]][piece["name"]]
        if out is None:
            out = np.empty(entry.get("data_shape", entry["shape"]), data.dtype)
        out[tuple(slice(a, b) for a, b in piece["index"])] = data
    return out if out is not None else np.empty(entry.get("data_shape", entry["shape"]))


def place_like(restored: Any, target: Any) -> Any:
    """Restored NumPy arrays laid out as ``target``'s leaves: a leaf whose target is a JAX array
    spanning several processes becomes a global array with the target's sharding (each process
    copies only its devices' pieces); other NumPy arrays become JAX arrays on the default
    device; keys and plain values stay as they are.

    Args:
        restored: what ``fbp.checkpoint.restore`` returned.
        target: the tree it was restored into.

    Returns:
        The placed tree.
    """
    def one(a, like):
        if not isinstance(a, np.ndarray):
            return a
        if isinstance(like, jax.Array) and not like.is_fully_addressable:
            return jax.make_array_from_callback(a.shape, like.sharding, lambda index: a[index])
        return jax.numpy.asarray(a)

    return jax.tree_util.tree_map(one, restored, target, is_leaf=lambda a: a is None)
