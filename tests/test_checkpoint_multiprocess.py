"""Checkpoints of a run over several processes (``fbp.checkpoint_shards``): each process writes
its own shards, a killed run leaves no partial step, and the run resumes bit-exactly on the same
number of processes (and on one, to the all-reduce's rounding).

Every run is a subprocess (``tests/_checkpoint_multiprocess_script.py``): two processes with
two simulated CPU devices each, joined by ``jax.distributed.initialize`` over gloo, or one
process with four devices (the same 4-device mesh).
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from fbp import checkpoint

pytestmark = pytest.mark.xdist_group("multiprocess checkpoints")  # one worker runs the subprocesses once
SCRIPT = os.path.join(os.path.dirname(__file__), "_checkpoint_multiprocess_script.py")
sys.path.insert(0, os.path.dirname(__file__))
from _checkpoint_multiprocess_script import EPOCHS, expected_shard_tree  # noqa: E402


def _env(devices: int) -> dict:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
    return {**os.environ, "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
            "JAX_PLATFORMS": "cpu"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(processes: int, directory, out, *extra) -> list:
    """Start a run (not waiting): 2 processes × 2 devices, or 1 × 4."""
    port = _port()
    return [subprocess.Popen([sys.executable, SCRIPT, str(i), str(processes), str(port), str(directory), str(out),
                              *extra], env=_env(4 // processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(processes)]


def _wait(runs: list) -> list[tuple[int, str]]:
    out = [p.communicate(timeout=300)[0] for run in runs for p in run]
    return [(p.returncode, text) for p, text in zip([p for run in runs for p in run], out, strict=True)]


def _params(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Round 1 (at once): the uninterrupted run; one killed when its third epoch starts; one
    killed while saving its second step. Round 2: the first killed run resumed on 2 processes
    and (from a copy) on 1; the second resumed on 2."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    first = [_start(2, tmp / "whole", tmp / "whole.npz", "--shards", str(tmp / "fsdp")),
             _start(2, tmp / "killed", tmp / "unused.npz", "--die-at-epoch", "2"),
             _start(2, tmp / "in_save", tmp / "unused2.npz", "--die-in-save", "2")]
    done = _wait(first)
    assert [code for code, _ in done] == [0, 0, 3, 3, 4, 4], "\n".join(text[-3000:] for _, text in done)
    killed_steps = checkpoint.all_steps(tmp / "killed")
    in_save = {"steps": checkpoint.all_steps(tmp / "in_save"), "leftovers": sorted(os.listdir(tmp / "in_save"))}
    shutil.copytree(tmp / "killed", tmp / "killed_copy")
    second = [_start(2, tmp / "killed", tmp / "resumed2.npz"), _start(1, tmp / "killed_copy", tmp / "resumed1.npz"),
              _start(2, tmp / "in_save", tmp / "in_save2.npz")]
    done = _wait(second)
    assert [code for code, _ in done] == [0, 0, 0, 0, 0], "\n".join(text[-3000:] for _, text in done)
    return {"tmp": tmp, "killed_steps": killed_steps, "in_save": in_save}


def test_each_process_writes_its_own_shards_and_the_manifest_lists_every_piece(runs):
    where = checkpoint.step_directory(runs["tmp"] / "whole", EPOCHS)
    names = sorted(os.listdir(where))
    assert names == ["manifest.json", "shards-00000.json", "shards-00000.npz", "shards-00001.json",
                     "shards-00001.npz"]
    with open(os.path.join(where, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["processes"] == 2 and set(manifest["sha256"]) == {"shards-00000.npz", "shards-00001.npz"}
    files = {p["file"] for e in manifest["leaves"] if e["kind"] != "value" for p in e["pieces"]}
    assert files == {"shards-00000.npz", "shards-00001.npz"}  # both processes wrote part of the replicated state
    for entry in manifest["leaves"]:
        if entry["kind"] != "value":
            assert len(entry["pieces"]) == 1  # a replicated leaf is written once
    fsdp = os.path.join(checkpoint.step_directory(runs["tmp"] / "fsdp", 7), "manifest.json")
    with open(fsdp) as f:
        big = next(e for e in json.load(f)["leaves"] if e["path"] == "big")
    assert sorted(p["index"][0] for p in big["pieces"]) == [[0, 256], [256, 512], [512, 768], [768, 1024]]
    assert {p["file"] for p in big["pieces"]} == {"shards-00000.npz", "shards-00001.npz"}


def test_a_sharded_checkpoint_of_two_processes_restores_in_one(runs):
    expected = expected_shard_tree()
    back = checkpoint.restore(runs["tmp"] / "fsdp", expected)
    assert back["name"] == "fsdp" and back["count"] == 3
    np.testing.assert_array_equal(back["big"], expected["big"])
    np.testing.assert_array_equal(back["small"], expected["small"])


def test_a_run_killed_mid_epoch_resumes_bit_exactly_on_two_processes(runs):
    assert runs["killed_steps"] == [1, 2]  # killed when epoch 3 started: its work was lost
    whole, resumed = _params(runs["tmp"] / "whole.npz"), _params(runs["tmp"] / "resumed2.npz")
    assert set(resumed) == set(whole)
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)


def test_the_same_run_resumes_on_one_process(runs):
    """On one process the checkpoint restores bit-exactly (the history of the two epochs run on
    two processes comes back to the bit); the epochs after it are summed by the one process's
    all-reduce instead of gloo's, so they agree to float32 rounding, not to the bit."""
    whole, resumed = _params(runs["tmp"] / "whole.npz"), _params(runs["tmp"] / "resumed1.npz")
    np.testing.assert_array_equal(resumed["loss"][:2], whole["loss"][:2])
    for key in whole:
        np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_a_run_killed_while_saving_leaves_no_partial_step_and_resumes_from_the_one_before(runs):
    assert runs["in_save"]["steps"] == [1]
    assert any(name.startswith(".tmp-step_00000002") for name in runs["in_save"]["leftovers"])
    assert not any(name.startswith(".tmp-") for name in os.listdir(runs["tmp"] / "in_save"))  # the next save cleaned
    whole, resumed = _params(runs["tmp"] / "whole.npz"), _params(runs["tmp"] / "in_save2.npz")
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)


def test_a_damaged_shard_is_refused(runs, tmp_path):
    shutil.copytree(runs["tmp"] / "fsdp", tmp_path / "fsdp")
    path = os.path.join(checkpoint.step_directory(tmp_path / "fsdp", 7), "shards-00001.npz")
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError, match="shards-00001.npz: checksum mismatch"):
        checkpoint.restore(tmp_path / "fsdp", expected_shard_tree())
    os.remove(path)
    with pytest.raises(checkpoint.CheckpointError, match="shards-00001.npz: missing"):
        checkpoint.restore(tmp_path / "fsdp", expected_shard_tree())
