"""Data parallel over 8 simulated CPU devices against one device (run in a subprocess: the
device count is fixed when JAX starts). The script is tests/_data_parallel_script.py."""

import json
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("_data_parallel_script.py")
pytestmark = pytest.mark.xdist_group("data parallel script")  # one worker runs the script once


@pytest.fixture(scope="module")
def measured():
    # the script inherits the suite's XLA flags (conftest) and sets its own device count and platform
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_step_and_twenty_adam_steps_equal_one_device(measured):
    assert measured["devices"] == 8
    assert measured["f64_one_step"] <= 1e-12
    assert measured["mlp_adam20"] <= 1e-5  # with dropout: the masks do not depend on the device count
    assert measured["cnn_bn_adam20"] <= 1e-5  # BatchNorm statistics over the global batch
    assert measured["fit_params"] <= 1e-5 and measured["fit_history"] <= 1e-5


def test_private_and_kfac_training_on_four_devices_equal_one_device(measured):
    # DP-SGD: the Poisson buffer rounded up to the device count, the same noise keys; float64
    assert measured["private_poisson"] <= 1e-10 and measured["private_fixed"] <= 1e-10
    assert measured["private_poisson_epsilon"][0] == measured["private_poisson_epsilon"][1]
    assert measured["kfac_fit"] <= 1e-10  # K-FAC's factors from the sharded pass
    assert measured["diagnostics_fit"] <= 1e-9  # every diagnostic of every step, relative, float64


def test_the_check_catches_a_step_without_the_cross_device_mean(measured):
    # each device stepping on its own shard's gradient: the same comparison fails by far
    assert measured["control_no_mean"] > 1e-3


def test_compiles_once_donates_and_lays_out_params(measured):
    assert measured["compilations"] == 1
    assert measured["donated"]
    assert measured["params_sharding"] == "P()"
    assert "data" in measured["fsdp_spec"] and measured["fsdp_diff"] <= 1e-12  # float64


def test_a_batch_the_devices_cannot_share_raises(measured):
    assert "batch of 12 examples cannot be split evenly over the 8 devices" in measured["indivisible"]


def test_bad_meshes_are_named():
    import jax

    from fbp import losses, nn, optim, parallel, privacy, train

    with pytest.raises(ValueError, match=r"num_devices must be an int in \[1, 1\]"):
        parallel.data_mesh(2)
    with pytest.raises(TypeError, match="mesh must be a 1-D jax.sharding.Mesh"):
        parallel.batch_sharding("data")
    model = nn.Serial(nn.Dense(3))
    x, y = jax.numpy.ones((8, 2)), jax.numpy.zeros(8, jax.numpy.int32)
    params = model.init(jax.random.PRNGKey(0), x)
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    with pytest.raises(ValueError, match="precision cannot be combined with privacy"):  # privacy with a mesh trains
        train.fit(model, loss, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(0), epochs=1, batch_size=4,
                  progress=False, mesh=parallel.data_mesh(), privacy=privacy.DPSGD(1.0, 1.0), precision="bfloat16")
    with pytest.raises(ValueError, match="mesh needs jit=True"):
        train.make_step(model, loss, optim.sgd(0.1), jit=False, mesh=parallel.data_mesh())
