"""Shared test settings: both precisions, with and without jit, and a faster compiler.

**Compilation.** Compiling dominates this suite (its shapes are tiny), so the tests run with
XLA's CPU backend at optimisation level 1 and without LLVM's expensive passes
(``--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true``): compiling
takes about a third less time, and the examples' training loops run no slower. The programs
are the same HLO; the machine code differs, so results can differ in the last bits from a run
at XLA's defaults, and every tolerance of the suite holds at both (``FBP_TEST_OPTIMIZED=1``
runs the suite with XLA's defaults). Subprocesses (examples, notebooks, multi-device scripts)
inherit the flags. Level 0 is not used: on this project's CPU it compiles wrong code. The whole
suite at level 0 (2026-12-05) failed six tests, among them JAX's own gradient of the
catalogue's Conv2D-BatchNorm-ReLU-Dropout-MaxPool model (NaN where level 1 gives the numbers
fbp's rules and finite differences agree on), and the data-parallel script.

XLA's newer CPU fusion emitters are turned off for the suite (``--xla_cpu_use_fusion_emitters=false``):
the older emitters compile the suite's many small programs about a quarter faster. XLA's
tree-reduction rewrite, which splits a large reduction into a reduce-window and a reduce (two
kernels), is turned off as well (``--xla_disable_hlo_passes=tree_reduction_rewriter``): a fit
with telemetry, whose per-layer statistics are many reductions, compiles faster.
Float32 sums are then accumulated less accurately, which can only make a tolerance harder to meet.
A program's LLVM module is compiled in one piece (``--xla_cpu_parallel_codegen_split_count=1``;
XLA splits it into 32 for parallel code generation): each worker has one core (below), so
the parts gain no parallelism and each costs its own setup. Replaying the suite's own programs
with ``benchmarks/bench_suite_compile.py``, XLA's 32 parts took 1.15–1.17× as long.

**One compilation cache per run.** ``JAX_COMPILATION_CACHE_DIR`` points at a fresh temporary
directory that the xdist workers and the subprocesses share (they inherit the environment), so
a program compiled alike by two tests, two workers or an eager op in both is compiled once.
Nothing persists between runs: the directory is removed when the run ends. ``FBP_TEST_CACHE=0``
turns it off.

**One core per worker.** Each xdist worker is pinned to its own core before JAX starts, so that
XLA's thread pools (sized from the cores a process may use) do not make two workers contend for
both cores. ``FBP_TEST_PIN=0`` turns it off.

**Precision × jit.** A test that takes both the ``dtype`` and the ``jit`` fixture runs in two
of the four combinations, float64 eagerly and float32 under jit, so each level of each factor
is exercised on every case (pairwise testing). Tests marked ``every_mode`` run all four.
"""

import os
import shutil
import tempfile

if os.environ.get("FBP_TEST_OPTIMIZED") != "1":  # before JAX creates its CPU client, which reads XLA_FLAGS once
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=1",
                                        "--xla_llvm_disable_expensive_passes=true",
                                        "--xla_cpu_use_fusion_emitters=false",
                                        "--xla_disable_hlo_passes=tree_reduction_rewriter",
                                        "--xla_cpu_parallel_codegen_split_count=1"]).strip()

# One core per xdist worker (worker i on the i-th core it may run on, modulo their number), set
# before JAX starts: XLA's CPU client sizes its thread pools from the cores a process may use
# (13 threads with one core against 17 with two, measured), so each worker keeps to its own core
# instead of two workers' pools contending for both. Subprocesses (examples, notebooks,
# multi-device scripts) inherit the core.
# ``FBP_TEST_PIN=0`` turns it off.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if os.environ.get("FBP_TEST_PIN") != "0" and _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cores[int(_WORKER[2:]) % len(_cores)]})

# One compilation cache for the run, shared by the xdist workers and the subprocesses, which
# inherit the environment: a program that two tests, two workers or an example compile alike
# is compiled once. The process that made the directory removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and os.environ.get("FBP_TEST_CACHE") != "0":
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fbp-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

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


# The quick tier (`pytest -m "not slow"`, about 2.3 minutes on two cores) runs every test function
# once, in its first parametrisation, and leaves out what runs whole programs or whole
# catalogues: examples, notebooks, multi-device and multi-process runs, the CLI, every-rule and
# every-family sweeps, randomised shapes, and the few single tests that take longest (fits,
# K-FAC on digits, whole sequence models). CI (`.ci/run`) runs everything.
SLOW_MODULES = ("test_examples.py", "test_notebooks.py", "test_parallel.py", "test_resume.py",
                "test_checkpoint_multiprocess.py")
SLOW_NAMES = ("every_builtin_rule", "test_cli_", "random_shapes", "family_in_a_sequence_model", "digits",
              "killed_mid_save", "class_losses_over_sequences", "stateful_random_model_end_to_end",
              "every_family_matches", "every_statistic_equals_its_independent_reference", "state_key_vmap_and_scan",
              "sum_grad_squared_and_variance", "poisson_batches_and_fit_with_privacy", "fit_records_each_epoch",
              "catches_a_wrong_factor_and_a_wrong_second_derivative", "expand_and_reduce_on_a_sequence",
              "every_python_block_of_the_page_runs", "noise_is_reproducible", "fit_carries_batch_norm_state",
              "factors_cover_attention_and_norms", "one_dense_layer_one_example", "stacked_recurrent_model",
              "monte_carlo_diagonal_converges", "cotangents_training_never_computes", "bfloat16_training_keeps",
              "alignment_angle_is_the_angle", "names_the_deviating_paths", "reverses_everything_below",
              "scan_epochs_equal_python_loop", "no_mask_reused_across_layers", "metrics_records_exactly",
              "training_inside_lax_scan", "factored_damping_is_martens", "moving_averages_and_the_inverse",
              # single tests of 4 s or more in the quick tier (measured with --durations, two workers)
              "every_built_in_leaf_declares", "an_lstm_with_dropout_and_a_transformer_under_fit",
              "diagnostics.py::test_without_jit", "property_per_example_grads_equal_vmap",
              "telemetry_stats_join_the_pass", "ggn_diagonals_join_the_same_call", "docs_page_is_the_generated_table",
              "eigenvalues_converge_with_their_residual_bounds", "structures_and_marginal_likelihood_equal_dense",
              "iteration_on_params_arrays_equals_the_flat_one", "ekfac_ranks_like_the_exact_influence",
              "every_quantity_equals_its_reference", "predictive_equals_the_linearised_formulas",
              "hessian_influence_equals_the_dense_hessian_inverse", "resumed_run_records_what_an_uninterrupted",
              "second_order.py::test_batch_norm_in_both_modes", "every_extension_from_one_call_equals_vmap_of_grad",
              "fit_alpha_and_steps_equal_a_direct", "lengths_including_one", "causal_attention_leaks_nothing",
              "the_draw_is_jax_s_own_threefry", "sampled_histogram_elements_are_per_example",
              "kronecker_and_similarity_methods_equal")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the quick tier (pytest -m 'not slow')")
    config.addinivalue_line("markers", "every_mode: run in all four precision × jit combinations, not two")


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        function = (item.path, getattr(item, "originalname", item.name))
        repeat = function in seen
        seen.add(function)
        where = f"{item.path.name}::{item.name}"
        if repeat or item.path.name in SLOW_MODULES or any(name in where for name in SLOW_NAMES):
            item.add_marker(pytest.mark.slow)
