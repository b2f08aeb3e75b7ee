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
leaves at most a ``.tmp-*`` directory, never a readable partial checkpoint.

**Retention never deletes the step just written.** After a save the directory holds that step
plus the newest ``keep - 1`` of the others. In order (the usual case) that is the newest
``keep`` steps. Out of order — saving step 3 when step 5 is on disk, as a run restarted from
an earlier point does — step 3 is kept, and with ``keep=1`` step 5 is removed, so
``latest_step`` names what was saved last; with a larger ``keep`` the newer steps stay (a
``UserWarning`` says that ``latest_step`` still names a newer one).

**Saves into one directory are serialised** by an exclusive lock on ``<directory>/.lock``
(``fcntl.flock``, where the platform has it) around the rename and the retention, so two
processes saving at once — even the same step — each leave a complete checkpoint and neither
fails on the other's files; a re-saved step is replaced by renaming the old one aside first.

**Paths are exact.** A dict key holding ``/`` or ``%`` is escaped (``%2F``, ``%25``) in the
manifest, so ``{"a/b": ...}`` beside ``{"a": {"b": ...}}`` are two different entries and
both round-trip.

**Restores are checked** against a ``target`` pytree of the same structure (the values are
ignored): a leaf missing or extra, or a shape or dtype that differs, raises
``CheckpointError`` naming the path; a flipped byte or a truncated file fails the
checksum; nothing read from the files is ever executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp import checkpoint_io, checkpoint_shards

try:  # POSIX; elsewhere saves are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT, VERSION = "fbp-checkpoint", 1
_STEP = re.compile(r"^step_(\d+)$")
_ARRAYS, _MANIFEST = "arrays.npz", "manifest.json"
_PLAIN = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored as asked: corrupt, truncated, not ours, or not
    matching the target structure (the message names the path)."""


# --------------------------------------------------------------------------- paths
def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


def _path(key_path) -> str:
    """``params/2/w``: dict keys, indices and attribute names joined by ``/``, each part with
    ``%`` and ``/`` escaped so that no two leaves share a path."""
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(_escape(str(getattr(k, attr))))
                break
        else:
            parts.append(_escape(str(k)))
    return "/".join(parts) or "<root>"


def _flatten(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda a: a is None)
    return [(_path(p), leaf) for p, leaf in leaves], treedef


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


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own digest (so a flipped byte in the
    structure, a step number or a plain value is caught like one in the arrays)."""
    body = {k: v for k, v in manifest.items() if k != "self_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_directory(directory) -> str:
    """Make sure checkpoints can be written into ``directory`` before anything is trained.

    Creates it if missing, then writes and removes a probe file, so a path that is a regular
    file, a read-only directory or a full disk is found now, not after the first epoch.

    Args:
        directory: the checkpoint directory.

    Returns:
        The directory as a string.

    Raises:
        CheckpointError: the path is not a directory, or it cannot be written.
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory!r} is a file, not a directory; choose another path")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {directory!r} cannot be written ({e.strerror or e}); "
                              f"choose a writable directory") from None
    return directory


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive lock on ``<directory>/.lock`` for the block (saves from several processes
    take turns); a no-op where ``fcntl`` is missing."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(os.path.join(directory, ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _retain(directory: str, step: int, keep: int | None) -> None:
    """Keep ``step`` and the newest ``keep - 1`` other steps (module docstring)."""
    others = [s for s in all_steps(directory) if s != step]
    if keep is not None:
        drop = others[:max(len(others) - (keep - 1), 0)]
        for old in drop:
            shutil.rmtree(step_directory(directory, old), ignore_errors=True)
        others = [s for s in others if s not in drop]
    newer = [s for s in others if s > step]
    if newer:
        warnings.warn(f"checkpoint.save: step {step} was saved into {directory!r}, which holds the newer step "
                      f"{newer[-1]}; latest_step (and fit(resume=True)) will pick step {newer[-1]}", UserWarning,
                      stacklevel=3)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory, tree: Any, step: int, *, keep: int | None = 3) -> str:
    """Write ``tree`` as checkpoint ``step`` in ``directory`` atomically; then keep that step and
    the newest ``keep - 1`` others (``None``: all; the step just written is never removed, also
    when it is older than steps on disk). Returns the step's directory. Leaves may be arrays (any dtype), typed
    or raw PRNG keys, and plain Python values; anything else raises ``TypeError`` naming it.

    Args:
        directory: the checkpoint directory (made if missing).
        tree: the pytree to write.
        step: its step number.
        keep: how many steps to keep, counting the one just written; ``None`` keeps all.

    Returns:
        The path of the step's directory.

    Raises:
        CheckpointError: ``directory`` is a file or cannot be written.
        TypeError: a leaf that is not an array, a key or a plain value.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint.save: step must be a non-negative int, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"checkpoint.save: keep must be a positive int or None, got {keep!r}")
    several = jax.process_count() > 1
    if not several or jax.process_index() == 0:
        directory = check_directory(directory) if not os.path.isdir(directory) else os.fspath(directory)
    directory = os.fspath(directory)
    entries, leaves = [], []
    for path, leaf in _flatten(tree)[0]:
        if isinstance(leaf, _PLAIN) and not isinstance(leaf, np.generic):
            entries.append({"path": path, "kind": "value", "value": leaf})
            leaves.append(None)
            continue
        if _is_key(leaf):
            data = jax.random.key_data(leaf)
            entries.append({"path": path, "kind": "key", "impl": str(jax.random.key_impl(leaf)),
                            "shape": list(leaf.shape), "data_shape": list(data.shape)})
        elif isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            data = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
            entries.append({"path": path, "kind": "array", "dtype": str(data.dtype), "shape": list(data.shape)})
        else:
            raise TypeError(f"checkpoint.save: the leaf at {path!r} is a {type(leaf).__name__}; checkpoints hold "
                            f"arrays, PRNG keys and plain values (int, float, str, bool, None)")
        leaves.append(data)
    if several:  # each process writes its own shards (fbp.checkpoint_shards)
        return checkpoint_shards.save(directory, entries, leaves, step,
                                      lambda tmp, parts: _commit(directory, tmp, step, keep, parts))
    arrays = {}
    for i, (entry, data) in enumerate(zip(entries, leaves, strict=True)):
        if data is not None:
            arrays[f"a{i}"] = checkpoint_io.storable(np.asarray(data))
            entry["name"] = f"a{i}"
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{int(step):08d}-", dir=directory)
    try:
        with open(os.path.join(tmp, _ARRAYS), "wb") as f:
            digest = {_ARRAYS: checkpoint_io.write_npz(f, arrays)}
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(directory, tmp, step, keep, {"leaves": entries, "sha256": digest})


def _commit(directory: str, tmp: str, step: int, keep: int | None, parts: dict) -> str:
    """Write the manifest into ``tmp`` (holding the step's array files), fsync, and make the step
    appear with one rename under the directory's lock; then retention. Returns the step's path."""
    final = step_directory(directory, step)
    try:
        manifest = {"format": FORMAT, "version": VERSION, "step": int(step), **parts,
                    "versions": {"jax": jax.__version__, "numpy": np.__version__}}
        manifest["self_sha256"] = _manifest_digest(manifest)
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        with _locked(directory):
            if os.path.exists(final):  # re-saving a step: the old one is renamed aside, then removed
                aside = tempfile.mkdtemp(prefix=f".old-step_{int(step):08d}-", dir=directory)
                os.rename(final, os.path.join(aside, "step"))
                os.rename(tmp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync(directory)
            _retain(directory, int(step), keep)
            checkpoint_shards.remove_leftovers(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --------------------------------------------------------------------------- restore
def saved_paths(directory, step: int) -> list[str]:
    """The leaf paths stored in checkpoint ``step`` of ``directory`` (from its checked manifest).

    Args:
        directory: the checkpoint directory.
        step: the step.

    Returns:
        The paths, in the order they were saved.

    Raises:
        CheckpointError: no such step, or a damaged manifest.
    """
    where = step_directory(directory, step)
    if not os.path.isdir(where):
        raise CheckpointError(f"{where}: no checkpoint at step {step} (found {all_steps(directory)})")
    return [entry["path"] for entry in _read_manifest(where)["leaves"]]


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


def _load_file(where: str, manifest: dict, name: str) -> dict[str, np.ndarray]:
    path = os.path.join(where, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:  # one read, the digest on what was read, the members as views (fbp.checkpoint_io)
        return checkpoint_io.read_npz(path, manifest.get("sha256", {}).get(name, ""))
    except checkpoint_io.DigestError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except checkpoint_io.UnreadableError as e:  # an object array (pickle) or a malformed member
        raise CheckpointError(f"{path}: refused ({e})") from None


def _load_arrays(where: str, manifest: dict) -> dict[str, np.ndarray]:
    """``{member: stored array}``; for a multi-process checkpoint ``{path: assembled array}``."""
    if "processes" not in manifest:
        return _load_file(where, manifest, _ARRAYS)
    files = {name: _load_file(where, manifest, name) for name in manifest["sha256"]}
    try:
        return {e["path"]: checkpoint_shards.assemble(e, files) for e in manifest["leaves"] if e["kind"] != "value"}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: a piece of an array is missing or malformed ({type(e).__name__}: {e})") \
            from None


def _leaf(entry, arrays, target_leaf):
    path = entry["path"]
    if entry["kind"] == "value":
        return entry["value"]
    data = arrays.get(entry["path"] if "pieces" in entry else entry.get("name"))
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


def restore(directory, target: Any, step: int | None = None, *, prefix: str | None = None) -> Any:
    """The checkpoint ``step`` (default: the latest) of ``directory``, as a pytree with the
    structure of ``target`` (whose values are not used; arrays come back as NumPy arrays, keys
    as typed JAX keys, plain values as themselves).

    Args:
        directory: the checkpoint directory.
        target: a pytree with the structure to restore into.
        step: which step; ``None`` for the latest.
        prefix: restore only the subtree at this path (``"carry/params"``: the params of a
            ``fit`` checkpoint); ``target`` then has that subtree's structure.

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
    if prefix is not None:  # the target's paths, under the prefix
        flat = [(prefix if p == "<root>" else f"{prefix}/{p}", leaf) for p, leaf in flat]
        saved = {p: e for p, e in saved.items() if p == prefix or p.startswith(prefix + "/")}
        if not saved:
            raise CheckpointError(f"{where}: nothing saved under {prefix!r} (the top-level entries are "
                                  f"{sorted({p.split('/')[0] for p in saved_paths(directory, step)})})")
    wanted = [p for p, _ in flat]
    missing, extra = [p for p in wanted if p not in saved], [p for p in saved if p not in set(wanted)]
    if missing or extra:
        raise CheckpointError(f"{where}: structure differs from the target — missing from the checkpoint: "
                              f"{missing[:5]}, not in the target: {extra[:5]}")
    arrays = _load_arrays(where, manifest)
    return jax.tree_util.tree_unflatten(treedef, [_leaf(saved[p], arrays, leaf) for p, leaf in flat])
