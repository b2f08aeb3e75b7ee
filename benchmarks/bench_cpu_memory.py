"""glibc's malloc thresholds (``fbp.cpu_memory``) on and off, in one process: fbp's jitted SGD step.

``import fbp`` raises glibc's mmap and trim thresholds to 256 MiB so that XLA's per-call
temporary buffers are reused instead of mapped afresh (and page-faulted in) on every call. The
thresholds can be changed at run time (``mallopt``), so both states share one process: each
round sets one state (``fbp.cpu_memory.set_thresholds``: "on" is fbp's 256 MiB, "off" 32 MiB,
where glibc's dynamic mmap threshold settles for buffers this size; the dynamic rule itself cannot
be restored in a process once set), releases free memory (``malloc_trim``), runs one warm-up
call and times a median of ``--reps`` calls of every workload, alternating the states' order
each round. Printed: each state's medians per round, and off / on (above 1: the setting is faster).

Workloads: the CNN of ``bench_cnn.py`` (batch 128, 34 MiB of temporaries), 3C3D of
``bench_diagnostics.py`` (batch 128), the MLP of ``bench_mlp.py``, and with ``--sequences`` the
LSTM and the transformer block of ``bench_sequence.py``.

Run: ``python benchmarks/bench_cpu_memory.py [--rounds 6] [--reps 5] [--sequences]`` (Linux with glibc).
"""

import argparse
import statistics
import time

import jax
from common import lstm_workload, mlp_workload, random_batch, sgd, transformer_workload

import fbp
from fbp import cpu_memory, losses

DEFAULT = 32 << 20  # the mmap threshold glibc's dynamic rule settles at (its cap) for buffers this size


def steps(sequences: bool) -> dict:
    import bench_cnn
    import bench_diagnostics

    loss = losses.CategoricalCrossEntropy(from_logits=True)
    workloads = {"cnn": (bench_cnn.fbp_model(), (128, 28, 28, 1)), "3c3d": bench_diagnostics.c3d3(),
                 "mlp": mlp_workload()}
    if sequences:
        workloads |= {"lstm": lstm_workload(), "transformer": transformer_workload()}
    calls = {}
    for name, (model, shape) in workloads.items():
        params, x, y = random_batch(model, shape)
        vg = fbp.value_and_grad(model, loss)
        step = jax.jit(lambda p, x, y, vg=vg: sgd(p, vg(p, x, y)[1]))
        jax.block_until_ready(step(params, x, y))
        calls[name] = lambda step=step, params=params, x=x, y=y: step(params, x, y)
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sequences", action="store_true")
    args = parser.parse_args(argv)
    libc = cpu_memory._glibc()
    if libc is None or not cpu_memory.set_thresholds(cpu_memory.THRESHOLD):
        raise SystemExit("glibc's mallopt is not available here")
    calls = steps(args.sequences)
    times = {(name, on): [] for name in calls for on in (True, False)}
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 else (False, True)):
            cpu_memory.set_thresholds(cpu_memory.THRESHOLD if on else DEFAULT)
            libc.malloc_trim(0)
            for name, call in calls.items():
                jax.block_until_ready(call())
                ts = []
                for _ in range(args.reps):
                    start = time.perf_counter()
                    jax.block_until_ready(call())
                    ts.append(time.perf_counter() - start)
                times[(name, on)].append(statistics.median(ts) * 1e3)
    print(f"jax {jax.__version__}; fbp's step, ms per call (median of {args.reps}), {args.rounds} alternating rounds")
    for name in calls:
        on, off = times[(name, True)], times[(name, False)]
        print(f"  {name}: on {min(on):.1f}–{max(on):.1f}   off {min(off):.1f}–{max(off):.1f}   "
              f"off / on {statistics.median(off) / statistics.median(on):.2f} (per round "
              f"{min(b / a for a, b in zip(on, off)):.2f}–{max(b / a for a, b in zip(on, off)):.2f})")


if __name__ == "__main__":
    main()
