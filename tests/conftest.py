"""Shared test settings: both precisions, with and without jit."""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("fbp", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("fbp")

PRECISIONS = [pytest.param(jnp.float64, id="f64"), pytest.param(jnp.float32, id="f32")]
JIT = [pytest.param(False, id="eager"), pytest.param(True, id="jit")]


@pytest.fixture(params=PRECISIONS)
def dtype(request):
    """The precision under test; float64 runs with x64 enabled for the whole test."""
    if request.param == jnp.float64:
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


@pytest.fixture(params=JIT)
def jit(request):
    return request.param


# The quick tier (`pytest -m "not slow"`) leaves out what runs whole programs or whole catalogues:
# examples, notebooks, multi-device and multi-process runs, the CLI, every-rule sweeps and the
# randomised-shape sweeps. CI (`.ci/run`) runs everything.
SLOW_MODULES = ("test_examples.py", "test_notebooks.py", "test_parallel.py", "test_resume.py")
SLOW_NAMES = ("every_builtin_rule", "test_cli_", "random_shapes", "family_in_a_sequence_model", "digits",
              "killed_mid_save", "class_losses_over_sequences", "stateful_random_model_end_to_end",
              "every_family_matches")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the quick tier (pytest -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or any(name in item.name for name in SLOW_NAMES):
            item.add_marker(pytest.mark.slow)
