"""Checkpoints: exact round trips, atomic writes, refusals of damaged or foreign files."""

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
    manifest["sha256"]["arrays.npz"] = checkpoint._sha256(str(_arrays(tmp_path)))
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
