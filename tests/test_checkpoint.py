"""Checkpoints: exact round trips, atomic writes, refusals of damaged or foreign files."""

import hashlib
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import checkpoint, optim
from fbp.checkpoint import CheckpointError


def _tree():
    params = {"dense": {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.zeros(3, jnp.bfloat16)},
              "ids": jnp.arange(4, dtype=jnp.int32)}
    return {"params": params, "opt_state": optim.adam(1e-3).init(params), "key": jax.random.key(7),
            "raw_key": jax.random.PRNGKey(3), "step": 12, "lr": 0.5, "note": "hello", "best": None,
            "flags": (True, [1.5, 2])}


def _same(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: x is None)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: x is None)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(x), jax.random.key_data(y))
        elif x is None or isinstance(x, (str, bool, int, float)):
            assert x == y and type(x) is type(y)
        else:
            assert np.asarray(x).dtype == np.asarray(y).dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_for_every_kind_of_leaf(tmp_path):
    tree = _tree()
    where = checkpoint.save(tmp_path, tree, 5)
    assert os.path.basename(where) == "step_00000005" and checkpoint.latest_step(tmp_path) == 5
    _same(checkpoint.restore(tmp_path, tree), tree)
    with jax.enable_x64(True):
        wide = {"x": jnp.linspace(0, 1, 7, dtype=jnp.float64), "n": np.float64(np.pi)}
        checkpoint.save(tmp_path / "wide", wide, 0)
        _same(checkpoint.restore(tmp_path / "wide", wide), wide)


def test_keeps_the_newest_and_ignores_unfinished_saves(tmp_path):
    tree = {"w": jnp.ones(3)}
    for step in range(5):
        checkpoint.save(tmp_path, {"w": jnp.full(3, step, jnp.float32)}, step, keep=2)
    assert checkpoint.all_steps(tmp_path) == [3, 4]
    os.makedirs(tmp_path / ".tmp-step_00000009-x")  # a save killed before its rename
    os.makedirs(tmp_path / "step_00000010")  # a directory without a manifest
    assert checkpoint.latest_step(tmp_path) == 4
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, tree)["w"], np.full(3, 4.0))
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, tree, step=3)["w"], np.full(3, 3.0))
    with pytest.raises(CheckpointError, match="no checkpoint at step 1"):
        checkpoint.restore(tmp_path, tree, step=1)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        checkpoint.restore(tmp_path / "empty", tree)


def test_a_target_that_differs_is_named(tmp_path):
    checkpoint.save(tmp_path, {"params": {"w": jnp.ones((2, 3))}, "step": 1}, 1)
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: \['params/b'\]"):
        checkpoint.restore(tmp_path, {"params": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "step": 0})
    with pytest.raises(CheckpointError, match=r"'params/w': expected float32\[3, 2\]"):
        checkpoint.restore(tmp_path, {"params": {"w": jnp.ones((3, 2))}, "step": 0})
    with pytest.raises(CheckpointError, match=r"'params/w': expected int32"):
        checkpoint.restore(tmp_path, {"params": {"w": jnp.ones((2, 3), jnp.int32)}, "step": 0})


def _arrays(tmp_path):
    return tmp_path / "step_00000001" / "arrays.npz"


def test_a_flipped_byte_or_a_truncated_file_is_refused(tmp_path):
    tree = {"w": jnp.arange(100.0)}
    checkpoint.save(tmp_path, tree, 1)
    data = bytearray(_arrays(tmp_path).read_bytes())
    data[len(data) // 2] ^= 0x01
    _arrays(tmp_path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.restore(tmp_path, tree)
    checkpoint.save(tmp_path, tree, 1)
    _arrays(tmp_path).write_bytes(_arrays(tmp_path).read_bytes()[:200])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.restore(tmp_path, tree)
    checkpoint.save(tmp_path, tree, 1)
    manifest = tmp_path / "step_00000001" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 2'))  # one edited value
    with pytest.raises(CheckpointError, match="manifest is corrupt or was edited"):
        checkpoint.restore(tmp_path, tree)
    (tmp_path / "step_00000001" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        checkpoint.restore(tmp_path, tree)


class _Payload:
    def __reduce__(self):
        return (open, (os.environ["FBP_PAYLOAD"], "w"))


def test_a_pickle_payload_is_never_executed(tmp_path, monkeypatch):
    """A forged checkpoint whose array is a pickled object (with a matching checksum, as a
    forger would write it) is refused, and the payload does not run."""
    tree = {"w": jnp.ones(2)}
    checkpoint.save(tmp_path, tree, 1)
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("FBP_PAYLOAD", str(marker))
    with zipfile.ZipFile(_arrays(tmp_path), "w") as z, z.open("a0.npy", "w") as f:
        np.lib.format.write_array(f, np.array([_Payload()], dtype=object), allow_pickle=True)
    manifest_path = tmp_path / "step_00000001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"]["arrays.npz"] = hashlib.sha256(_arrays(tmp_path).read_bytes()).hexdigest()
    manifest["self_sha256"] = checkpoint._manifest_digest(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.restore(tmp_path, tree)
    assert not marker.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="leaf at 'f' is a function"):
        checkpoint.save(tmp_path, {"f": lambda: 0}, 0)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        checkpoint.save(tmp_path, {}, -1)
    with pytest.raises(ValueError, match="keep must be"):
        checkpoint.save(tmp_path, {}, 0, keep=0)
    assert checkpoint.all_steps(tmp_path) == []  # nothing half-written was left behind


# --------------------------------------------------------------------------- faults (issue 26)
@pytest.mark.parametrize("keep", [1, 2, 3, None])
def test_out_of_order_saves_never_delete_the_step_just_written(tmp_path, keep):
    """Saving a step lower than those on disk keeps it (and the newest keep-1 others)."""
    for step in (5, 7, 9):
        checkpoint.save(tmp_path, {"w": jnp.full(2, step, jnp.float32)}, step, keep=keep)
    with pytest.warns(UserWarning, match="latest_step") if keep != 1 else _no_warning():
        where = checkpoint.save(tmp_path, {"w": jnp.full(2, 3.0)}, 3, keep=keep)
    assert os.path.isdir(where) and 3 in checkpoint.all_steps(tmp_path)
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, {"w": jnp.ones(2)}, step=3)["w"], np.full(2, 3.0))
    expected = {1: [3], 2: [3, 9], 3: [3, 7, 9], None: [3, 5, 7, 9]}[keep]
    assert checkpoint.all_steps(tmp_path) == expected
    if keep == 1:  # what was saved last is what latest_step (and a resume) picks
        assert checkpoint.latest_step(tmp_path) == 3


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def test_keys_that_collide_once_flattened_round_trip_exactly(tmp_path):
    tree = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(2)}, "c%2Fd": jnp.full(2, 2.0), "c/d": jnp.full(2, 3.0)}
    checkpoint.save(tmp_path, tree, 0)
    back = checkpoint.restore(tmp_path, tree)
    for leaf, kept in ((back["a/b"], 0.0), (back["a"]["b"], 1.0), (back["c%2Fd"], 2.0), (back["c/d"], 3.0)):
        np.testing.assert_array_equal(leaf, np.full(2, kept))


def test_a_target_path_that_is_a_file_or_read_only_is_refused_before_writing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        checkpoint.save(a_file, {"w": jnp.ones(2)}, 0)
    with pytest.raises(CheckpointError, match="is a file"):
        checkpoint.check_directory(a_file)
    denied = tmp_path / "denied"

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as mp:  # what a read-only directory answers (also when tests run as root)
        mp.setattr(checkpoint.tempfile, "mkstemp", refuse)
        with pytest.raises(CheckpointError, match="cannot be written .Permission denied"):
            checkpoint.check_directory(denied)
    if os.geteuid() == 0:
        return  # root ignores directory permissions
    locked = tmp_path / "ro"
    checkpoint.save(locked, {"w": jnp.ones(2)}, 0)
    os.chmod(locked, 0o500)
    try:
        with pytest.raises(CheckpointError, match="cannot be written"):
            checkpoint.check_directory(locked)
        with pytest.raises(OSError):
            checkpoint.save(locked, {"w": jnp.ones(2)}, 1)
        assert checkpoint.all_steps(locked) == [0]  # what was saved is still there
    finally:
        os.chmod(locked, 0o700)


CONCURRENT = """
import sys
import jax.numpy as jnp
from fbp import checkpoint
who, where = int(sys.argv[1]), sys.argv[2]
for step in range(60):
    # both processes write every step (the same steps at the same time), then keep all
    checkpoint.save(where, {"w": jnp.full(64, 100 * who + step, jnp.float32), "who": who}, step % 3, keep=None)
print("ok")
"""


def test_concurrent_saves_from_two_processes_leave_complete_checkpoints(tmp_path):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, str(who), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert checkpoint.all_steps(tmp_path) == list(range(3))
    for step in range(3):  # each step is one process's complete, consistent save
        back = checkpoint.restore(tmp_path, {"w": jnp.ones(64), "who": 0}, step=step)
        assert back["who"] in (1, 2)
        np.testing.assert_array_equal(back["w"], np.full(64, 100 * back["who"] + step + 57, np.float32))
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".tmp-", ".old-"))]


def test_a_subtree_restores_by_its_prefix(tmp_path):
    tree = {"carry": {"params": {"w": np.arange(3.0), "b": np.ones(2, np.float32)}, "n": 4}, "key": "x"}
    checkpoint.save(tmp_path, tree, 2)
    back = checkpoint.restore(tmp_path, {"w": np.zeros(3), "b": np.zeros(2, np.float32)}, prefix="carry/params")
    np.testing.assert_array_equal(back["w"], tree["carry"]["params"]["w"])
    np.testing.assert_array_equal(back["b"], tree["carry"]["params"]["b"])
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        checkpoint.restore(tmp_path, {"w": np.zeros(3)}, prefix="carry/params")
    with pytest.raises(CheckpointError, match="nothing saved under 'params'"):
        checkpoint.restore(tmp_path, {"w": np.zeros(3)}, prefix="params")
