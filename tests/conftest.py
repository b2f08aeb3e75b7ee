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
