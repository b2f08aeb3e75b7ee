"""Shared test settings: both precisions, with and without jit, and a faster compiler.

**Compilation.** Compiling dominates this suite (its shapes are tiny), so the tests run with
XLA's CPU backend at optimisation level 1 and without LLVM's expensive passes
(``--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true``): compiling
takes about a third less time, and the examples' training loops run no slower. The programs
are the same HLO; the machine code differs, so results can differ in the last bits from a run
at XLA's defaults, and every tolerance of the suite holds at both (``FBP_TEST_OPTIMIZED=1``
runs the suite with XLA's defaults). Subprocesses (examples, notebooks, multi-device scripts)
inherit the flags. Level 0 is not used: on this project's CPU it compiled one of JAX's own
reference gradients wrongly (the catalogue's Conv2D-BatchNorm-ReLU-Dropout-MaxPool model).

**Precision × jit.** A test that takes both the ``dtype`` and the ``jit`` fixture runs in two
of the four combinations, float64 eagerly and float32 under jit, so each level of each factor
is exercised on every case (pairwise testing). Tests marked ``every_mode`` run all four.
"""

import os

if os.environ.get("FBP_TEST_OPTIMIZED") != "1":  # before JAX creates its CPU client, which reads XLA_FLAGS once
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("fbp", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("fbp")

PRECISIONS = {"f64": jnp.float64, "f32": jnp.float32}
MODES = {"eager": False, "jit": True}
PAIRWISE = [("f64", "eager"), ("f32", "jit")]
EVERY_MODE = [(d, m) for d in PRECISIONS for m in MODES]


@pytest.fixture
def dtype(request):
    """The precision under test; float64 runs with x64 enabled for the whole test."""
    if request.param == jnp.float64:
        with jax.enable_x64(True):
            yield request.param
    else:
        yield request.param


@pytest.fixture
def jit(request):
    return request.param


def _parametrized_by_marker(metafunc) -> set[str]:
    names = set()
    for marker in metafunc.definition.iter_markers("parametrize"):
        argnames = marker.args[0]
        names |= {n.strip() for n in (argnames.split(",") if isinstance(argnames, str) else argnames)}
    return names


def pytest_generate_tests(metafunc):
    wanted = {"dtype", "jit"} & set(metafunc.fixturenames) - _parametrized_by_marker(metafunc)
    if wanted == {"dtype", "jit"}:
        combos = EVERY_MODE if metafunc.definition.get_closest_marker("every_mode") else PAIRWISE
        metafunc.parametrize(("dtype", "jit"), [(PRECISIONS[d], MODES[m]) for d, m in combos], indirect=True,
                             ids=[f"{d}-{m}" for d, m in combos])
    elif wanted == {"dtype"}:
        metafunc.parametrize("dtype", list(PRECISIONS.values()), indirect=True, ids=list(PRECISIONS))
    elif wanted == {"jit"}:
        metafunc.parametrize("jit", list(MODES.values()), indirect=True, ids=list(MODES))


# The quick tier (`pytest -m "not slow"`) leaves out what runs whole programs or whole catalogues:
# examples, notebooks, multi-device and multi-process runs, the CLI, every-rule sweeps and the
# randomised-shape sweeps. CI (`.ci/run`) runs everything.
SLOW_MODULES = ("test_examples.py", "test_notebooks.py", "test_parallel.py", "test_resume.py")
SLOW_NAMES = ("every_builtin_rule", "test_cli_", "random_shapes", "family_in_a_sequence_model", "digits",
              "killed_mid_save", "class_losses_over_sequences", "stateful_random_model_end_to_end",
              "every_family_matches")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the quick tier (pytest -m 'not slow')")
    config.addinivalue_line("markers", "every_mode: run in all four precision × jit combinations, not two")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES or any(name in item.name for name in SLOW_NAMES):
            item.add_marker(pytest.mark.slow)
