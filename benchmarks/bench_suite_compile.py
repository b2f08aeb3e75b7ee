"""The test suite's XLA compile time under one compiler setting against another, on the suite's
own programs.

Compiling dominates the test suite, and a whole-suite timing moves by ±15 % between runs on
this machine, far more than most compiler settings change. So this script compares settings on
a fixed corpus, in one process:

1. **record**: run the given test files once (``pytest -n 0``, the suite's own settings from
   ``tests/conftest.py``) with a hook on JAX's call into XLA (``jax._src.compiler
   .backend_compile_and_load``, JAX-internal) that keeps every single-device program it
   compiles, as MLIR bytecode;
2. **replay**: compile each recorded program twice, once with the suite's settings and once
   with them plus the overrides of ``--set`` (passed per compilation, as JAX's
   ``compiler_options`` are), alternating which goes first, and sum the seconds of each. The
   process keeps to one core, as each of the suite's xdist workers does (``tests/conftest.py``):
   a setting that compiles in parallel threads would otherwise win here and not there.

Printed per run: both sums and their ratio (below 1: the overrides compile faster). What the
overrides do to the compiled code is not measured here: a setting that wins must then pass the
whole suite (``pytest``) before it goes into ``tests/conftest.py``.

Run: ``python benchmarks/bench_suite_compile.py [--tests tests/test_capabilities.py ...]
[--set NAME=VALUE ...] [--runs 3] [--every 2]``. The default ``--set`` is XLA's own default
split of a program's LLVM module into 32 parts for parallel code generation, against the
suite's one part (``tests/conftest.py``): above 1, the suite's setting compiles faster.
"""

import argparse
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

RECORD = r"""
import atexit, pickle, sys
import jax._src.compiler as compiler
from jax._src.interpreters import mlir

programs = []
original = compiler.backend_compile_and_load


def recording(backend, module, devices, options, host_callbacks, *args, **kwargs):
    if len(devices) == 1 and not host_callbacks:
        programs.append(mlir.module_to_bytecode(module))
    return original(backend, module, devices, options, host_callbacks, *args, **kwargs)


compiler.backend_compile_and_load = recording
atexit.register(lambda: pickle.dump(programs, open(sys.argv[1], "wb")))
import pytest
sys.exit(pytest.main(["-n", "0", "-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def record(tests: list[str], out: str) -> None:
    """Run ``tests`` in a child process (no compilation cache: every program is compiled)."""
    env = {**os.environ, "FBP_TEST_CACHE": "0"}
    subprocess.run([sys.executable, "-c", RECORD, out, *tests], cwd=ROOT, env=env, check=True)


def _value(text: str):
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def replay(path: str, overrides: dict, runs: int, every: int) -> list[float]:
    """``runs`` passes over every ``every``-th recorded program; returns each pass's ratio."""
    os.environ.setdefault("FBP_TEST_CACHE", "0")  # conftest would make a compilation cache directory
    if hasattr(os, "sched_setaffinity"):  # one core, as each of the suite's xdist workers has
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: F401  (the suite's XLA flags, set before JAX creates its CPU client)
    from jax._src import compiler, xla_bridge
    from jax._src.lib import xla_client

    with open(path, "rb") as f:
        programs = pickle.load(f)[::every]
    backend = xla_bridge.get_backend()
    devices = xla_client.DeviceList(tuple(backend.devices()[:1]))

    def compile_seconds(program, changed: bool) -> float:
        options = compiler.get_compile_options(num_replicas=1, num_partitions=1)
        if changed:
            options.env_option_overrides = list(overrides.items())
        start = time.perf_counter()
        backend.compile_and_load(program, executable_devices=devices, compile_options=options)
        return time.perf_counter() - start

    compile_seconds(programs[0], False), compile_seconds(programs[0], True)  # warm up both
    ratios = []
    for run in range(runs):
        total = {False: 0.0, True: 0.0}
        for i, program in enumerate(programs):
            for changed in ((False, True) if (i + run) % 2 else (True, False)):
                total[changed] += compile_seconds(program, changed)
        ratios.append(total[True] / total[False])
        print(f"  run {run + 1}: {len(programs)} programs, suite settings {total[False]:.2f} s, "
              f"with {overrides} {total[True]:.2f} s, ratio {ratios[-1]:.3f}", flush=True)
    return ratios


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests", nargs="+", default=["tests/test_capabilities.py"])
    parser.add_argument("--set", nargs="+", default=["xla_cpu_parallel_codegen_split_count=32"],
                        help="XLA debug options to compare, NAME=VALUE")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--every", type=int, default=2, help="replay every n-th recorded program")
    parser.add_argument("--corpus", help="a recorded corpus to reuse (skips recording)")
    args = parser.parse_args()
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.corpus:
        path = args.corpus
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="fbp-compile-corpus-"), "programs.pkl")
        print(f"recording the programs of {' '.join(args.tests)} into {path}", flush=True)
        record(args.tests, path)
    # The suite's settings apply here too: the same flags as ``tests/conftest.py``, for this process.
    ratios = replay(path, overrides, args.runs, args.every)
    print(f"compile time with {overrides} / the suite's settings: {min(ratios):.3f}–{max(ratios):.3f}")


if __name__ == "__main__":
    main()
