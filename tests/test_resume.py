"""fit(checkpoint_dir=..., resume=True): a run interrupted — even by SIGKILL mid-save — and
resumed ends bit-identical to one that never stopped."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from fbp import checkpoint

SETUP = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from fbp import losses, nn, optim, train

    MODEL = nn.Serial(nn.Dense(16, use_bias=False), nn.BatchNorm(), nn.ReLU(), nn.Dropout(0.3), nn.Dense(3))
    X = jax.random.normal(jax.random.PRNGKey(0), (96, 5))
    Y = jax.random.randint(jax.random.PRNGKey(1), (96,), 0, 3)
    PARAMS = MODEL.init(jax.random.PRNGKey(2), X)

    def run(epochs, **kwargs):
        return train.fit(MODEL, losses.CategoricalCrossEntropy(from_logits=True), optim.adam(1e-2), PARAMS, X, Y,
                         key=jax.random.PRNGKey(3), epochs=epochs, batch_size=16, validation_split=0.25,
                         early_stopping=train.EarlyStopping("val_loss", patience=50), progress=False, **kwargs)
""")
namespace: dict = {}
exec(SETUP, namespace)  # noqa: S102 - the same definitions the child process runs
run = namespace["run"]
EPOCHS = 8


def _assert_identical(a, b):
    for name in ("params", "opt_state", "state"):
        la, lb = jax.tree_util.tree_leaves(getattr(a, name)), jax.tree_util.tree_leaves(getattr(b, name))
        assert len(la) == len(lb) > 0
        for u, v in zip(la, lb, strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)
    assert set(a.history) == set(b.history)
    for k in a.history:
        if k != "seconds":
            np.testing.assert_array_equal(a.history[k], b.history[k], err_msg=k)
    assert (a.best_epoch, a.epochs_run, a.stop_reason) == (b.best_epoch, b.epochs_run, b.stop_reason)


@pytest.fixture(scope="module")
def uninterrupted():
    return run(EPOCHS)


def test_stopping_and_resuming_in_process_is_exact(uninterrupted, tmp_path):
    first = run(3, checkpoint_dir=tmp_path)
    assert checkpoint.all_steps(tmp_path) == [1, 2, 3] and first.epochs_run == 3
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=True"):
        run(EPOCHS, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different key"):
        namespace["train"].fit(namespace["MODEL"], namespace["losses"].CategoricalCrossEntropy(from_logits=True),
                               namespace["optim"].adam(1e-2), namespace["PARAMS"], namespace["X"], namespace["Y"],
                               key=jax.random.PRNGKey(4), epochs=EPOCHS, batch_size=16, validation_split=0.25,
                               early_stopping=namespace["train"].EarlyStopping("val_loss", patience=50),
                               progress=False, checkpoint_dir=tmp_path, resume=True)
    _assert_identical(run(EPOCHS, checkpoint_dir=tmp_path, resume=True), uninterrupted)
    assert checkpoint.all_steps(tmp_path) == [6, 7, 8]  # keep_checkpoints=3
    # resuming a finished run trains nothing more and returns the same result
    _assert_identical(run(EPOCHS, checkpoint_dir=tmp_path, resume=True), uninterrupted)


def test_a_run_killed_mid_save_resumes_bit_identical(uninterrupted, tmp_path):
    child = tmp_path / "child.py"
    child.write_text(SETUP + textwrap.dedent(f"""
        import time
        from fbp import checkpoint
        fsync = checkpoint._fsync
        def slow_fsync(path):  # widen the window in which a save is half-done
            time.sleep(0.15)
            fsync(path)
        checkpoint._fsync = slow_fsync
        run({EPOCHS}, checkpoint_dir={str(tmp_path / "ckpt")!r})
    """))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(child)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    try:
        while checkpoint.latest_step(tmp_path / "ckpt") is None or checkpoint.latest_step(tmp_path / "ckpt") < 3:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the child made no progress"
            time.sleep(0.02)
        time.sleep(0.1)  # into the next epoch's save (its fsyncs sleep)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    reached = checkpoint.latest_step(tmp_path / "ckpt")
    assert proc.returncode == -signal.SIGKILL and 3 <= reached < EPOCHS
    _assert_identical(run(EPOCHS, checkpoint_dir=tmp_path / "ckpt", resume=True), uninterrupted)


def test_bad_checkpoint_arguments(tmp_path):
    with pytest.raises(ValueError, match="resume=True needs the checkpoint_dir"):
        run(2, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every"):
        run(2, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_dir must be a path"):
        run(2, checkpoint_dir=3)


def test_two_runs_from_one_key_are_bit_identical(uninterrupted):
    """Determinism on CPU: shuffles, dropout and the reductions repeat exactly (on GPU see the
    README's XLA flags for deterministic reductions)."""
    _assert_identical(run(EPOCHS), uninterrupted)


def test_resume_with_changed_settings_is_refused_naming_each(tmp_path):
    """A resumed run must be the checkpointed one: a changed learning rate, batch size or data
    set size is refused (telemetry and history would otherwise mix two runs); epochs may grow."""
    import jax.numpy as jnp

    from fbp import losses, nn, optim, train

    model = nn.Serial(nn.Dense(4), nn.ReLU(), nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (40, 5))
    y = jax.random.randint(jax.random.PRNGKey(1), (40,), 0, 3)
    params = model.init(jax.random.PRNGKey(2), x)

    def go(epochs=1, lr=0.1, batch_size=8, n=40, **kwargs):
        return train.fit(model, losses.CategoricalCrossEntropy(from_logits=True), optim.sgd(lr), params, x[:n], y[:n],
                         key=jax.random.PRNGKey(3), epochs=epochs, batch_size=batch_size, progress=False,
                         checkpoint_dir=tmp_path, **kwargs)

    go()
    for change, pattern in (({"lr": 0.2}, "optimizer's first update"), ({"batch_size": 10}, "batch_size: 8 in the"),
                            ({"n": 32}, "training examples: 40 in the checkpointed run, 32 now"),
                            ({"telemetry": True}, "telemetry: False")):
        with pytest.raises(ValueError, match=pattern):
            go(2, resume=True, **change)
    assert checkpoint.all_steps(tmp_path) == [1]  # nothing was written by a refused resume
    assert go(2, resume=True).epochs_run == 2  # the same settings, more epochs: continues
    assert jnp.isfinite(go(2, resume=True, lr=0.1 + 1e-9).history["loss"][-1])  # within the probe's tolerance


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    a_file = tmp_path / "ckpt"
    a_file.write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="is a file"):
        run(1, checkpoint_dir=a_file)
