"""Checkpoints that cannot execute code, cannot be half-written, and restore to the bit.

A checkpoint of a pytree at ``step`` is a directory ``<directory>/step_<step>`` holding

* ``arrays.npz`` — every array leaf, written by NumPy **without pickle** (``allow_pickle=False``
  on reading, so an object array, the only way a ``.npy`` file carries code, is refused);
  dtypes NumPy does not know (bfloat16, float8) are stored as same-width unsigned integers
  and viewed back;
* ``manifest.json`` — the structure: each leaf's path (``params/2/w``), kind (array, PRNG key,
  plain value), dtype and shape; PRNG keys as their key data with the implementation's name
  (``jax.random.key_data``); plain Python values (ints, floats, strings, ``None``, bools) in
  the JSON itself; the SHA-256 of ``arrays.npz`` and of the manifest's own content; the
  format version and the JAX/NumPy versions.

**Writes are atomic**: everything goes into a temporary sibling directory, files and
directory are fsynced, and one ``rename`` makes the step appear — a process killed mid-save
leaves at most a ``.tmp-*`` directory, never a readable partial checkpoint. The newest
``keep`` steps are kept.

**Restores are checked** against a ``target`` pytree of the same structure (the values are
ignored): a leaf missing or extra, or a shape or dtype that differs, raises
``CheckpointError`` naming the path; a flipped byte or a truncated file fails the
checksum; nothing read from the files is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.validation import path_name

FORMAT, VERSION = "fbp-checkpoint", 1
_STEP = re.compile(r"^step_(\d+)$")
_ARRAYS, _MANIFEST = "arrays.npz", "manifest.json"
_PLAIN = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored as asked: corrupt, truncated, not ours, or not
    matching the target structure (the message names the path)."""


# --------------------------------------------------------------------------- paths
def _flatten(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda a: a is None)
    return [(path_name(p) or "<root>", leaf) for p, leaf in leaves], treedef


def step_directory(directory, step: int) -> str:
    """The path of checkpoint ``step`` in ``directory`` (``step_00000042``).

    Args:
        directory: the checkpoint directory.
        step: the step number.

    Returns:
        The path, as a string.
    """
    return os.path.join(os.fspath(directory), f"step_{int(step):08d}")


def all_steps(directory) -> list[int]:
    """The complete checkpoints in ``directory``, oldest first (``.tmp-*`` leftovers are not).

    Args:
        directory: the checkpoint directory.

    Returns:
        The step numbers, ascending.
    """
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP.match(name)
        if m and os.path.isfile(os.path.join(directory, name, _MANIFEST)):
            found.append(int(m.group(1)))
    return sorted(found)


def latest_step(directory) -> int | None:
    """The newest complete step in ``directory``, or ``None``.

    Args:
        directory: the checkpoint directory.

    Returns:
        The newest step number, or ``None`` when there is none.
    """
    steps = all_steps(directory)
    return steps[-1] if steps else None


# --------------------------------------------------------------------------- save
def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _storable(a: np.ndarray) -> np.ndarray:
    """``a`` as a dtype NumPy writes natively (bfloat16 etc. as same-width unsigned ints)."""
    if a.dtype.kind in "biufc" and type(a.dtype).__module__ == "numpy":
        return a
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own digest (so a flipped byte in the
    structure, a step number or a plain value is caught like one in the arrays)."""
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory, tree: Any, step: int, *, keep: int | None = 3) -> str:
    """Write ``tree`` as checkpoint ``step`` in ``directory`` atomically; keep the newest ``keep``
    steps (``None``: all). Returns the step's directory. Leaves may be arrays (any dtype), typed
    or raw PRNG keys, and plain Python values; anything else raises ``TypeError`` naming it.

    Args:
        directory: the checkpoint directory (made if missing).
        tree: the pytree to write.
        step: its step number.
        keep: how many of the newest steps to keep; ``None`` keeps all.

    Returns:
        The path of the step's directory.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint.save: step must be a non-negative int, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoint.save: keep must be a positive int or None, got {keep!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    entries, arrays = [], {}
    for i, (path, leaf) in enumerate(_flatten(tree)[0]):
        if isinstance(leaf, _PLAIN) and not isinstance(leaf, np.generic):
            entries.append({"path": path, "kind": "value", "value": leaf})
            continue
        if _is_key(leaf):
            data = np.asarray(jax.random.key_data(leaf))
            entries.append({"path": path, "kind": "key", "impl": str(jax.random.key_impl(leaf)),
                            "shape": list(leaf.shape)})
        elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            data = np.asarray(leaf)
            entries.append({"path": path, "kind": "array", "dtype": str(data.dtype), "shape": list(data.shape)})
        else:
            raise TypeError(f"checkpoint.save: the leaf at {path!r} is a {type(leaf).__name__}; checkpoints hold "
                            f"arrays, PRNG keys and plain values (int, float, str, bool, None)")
        arrays[f"a{i}"] = _storable(data)
        entries[-1]["name"] = f"a{i}"
    final = step_directory(directory, step)
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{int(step):08d}-", dir=directory)
    try:
        with open(os.path.join(tmp, _ARRAYS), "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "leaves": entries,
                    "sha256": {_ARRAYS: _sha256(os.path.join(tmp, _ARRAYS))},
                    "versions": {"jax": jax.__version__, "numpy": np.__version__}}
        manifest["self_sha256"] = _manifest_digest(manifest)
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if os.path.exists(final):  # re-saving a step replaces it, still atomically visible
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in all_steps(directory)[:-keep]:
            shutil.rmtree(step_directory(directory, old), ignore_errors=True)
    return final


# --------------------------------------------------------------------------- restore
def _read_manifest(where: str) -> dict:
    path = os.path.join(where, _MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an fbp checkpoint")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')!r}, this fbp reads {VERSION}")
    if manifest.get("self_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"{path}: checksum mismatch — the manifest is corrupt or was edited")
    return manifest


def _load_arrays(where: str, manifest: dict) -> dict[str, np.ndarray]:
    path = os.path.join(where, _ARRAYS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    if _sha256(path) != manifest.get("sha256", {}).get(_ARRAYS):
        raise CheckpointError(f"{path}: checksum mismatch — the file is corrupt or truncated")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as e:  # an object array (pickle) or a malformed member
        raise CheckpointError(f"{path}: refused ({e})") from None
    except Exception as e:  # noqa: BLE001 - zipfile/format errors of a damaged file
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _leaf(entry, arrays, target_leaf):
    path = entry["path"]
    if entry["kind"] == "value":
        return entry["value"]
    data = arrays.get(entry.get("name"))
    if data is None:
        raise CheckpointError(f"the array for {path!r} is missing from the checkpoint")
    if entry["kind"] == "key":
        if not _is_key(target_leaf):
            raise CheckpointError(f"{path!r}: the checkpoint holds a PRNG key, the target a {type(target_leaf)}")
        impl = str(jax.random.key_impl(target_leaf))
        if entry["impl"] != impl or list(target_leaf.shape) != entry["shape"]:
            raise CheckpointError(f"{path!r}: expected a {impl} key of shape {tuple(target_leaf.shape)}, the "
                                  f"checkpoint holds a {entry['impl']} key of shape {tuple(entry['shape'])}")
        return jax.random.wrap_key_data(jnp.asarray(data), impl=impl)
    dtype = jnp.dtype(entry["dtype"])
    value = data.view(dtype) if data.dtype != dtype else data
    expected = (tuple(np.shape(target_leaf)), np.dtype(getattr(target_leaf, "dtype", None) or
                                                       np.asarray(target_leaf).dtype))
    if tuple(value.shape) != tuple(entry["shape"]) or expected != (tuple(value.shape), dtype):
        raise CheckpointError(f"{path!r}: expected {expected[1]}{list(expected[0])}, the checkpoint holds "
                              f"{dtype}{list(value.shape)}")
    return value[()] if isinstance(target_leaf, np.generic) else value


def restore(directory, target: Any, step: int | None = None) -> Any:
    """The checkpoint ``step`` (default: the latest) of ``directory``, as a pytree with the
    structure of ``target`` (whose values are not used; arrays come back as NumPy arrays, keys
    as typed JAX keys, plain values as themselves).

    Args:
        directory: the checkpoint directory.
        target: a pytree with the structure to restore into.
        step: which step; ``None`` for the latest.

    Returns:
        The restored pytree. Raises ``CheckpointError`` when there is no checkpoint, no such step, or the structure
        differs.
    """
    step = latest_step(directory) if step is None else step
    if step is None:
        raise CheckpointError(f"{os.fspath(directory)}: no checkpoint found")
    where = step_directory(directory, step)
    if not os.path.isdir(where):
        raise CheckpointError(f"{where}: no checkpoint at step {step} (found {all_steps(directory)})")
    manifest = _read_manifest(where)
    saved = {e["path"]: e for e in manifest["leaves"]}
    flat, treedef = _flatten(target)
    wanted = [p for p, _ in flat]
    missing, extra = [p for p in wanted if p not in saved], [p for p in saved if p not in set(wanted)]
    if missing or extra:
        raise CheckpointError(f"{where}: structure differs from the target — missing from the checkpoint: "
                              f"{missing[:5]}, not in the target: {extra[:5]}")
    arrays = _load_arrays(where, manifest)
    return jax.tree_util.tree_unflatten(treedef, [_leaf(saved[p], arrays, leaf) for p, leaf in flat])
