"""Where a jitted step's time goes, per XLA op: a profile that names the kernels.

Runs each candidate under ``jax.profiler.trace`` (a Perfetto trace, read back here as JSON, so
nothing beyond JAX is needed) and prints the ops that took the most time per call: XLA's
fusions (``ynn_fusion`` is a matmul or convolution run by XNNPACK's successor, YNNPACK, on the
CPU), its dots and its loops, with the executor's wall time beside their sum (a wall time well
above it means ops waited on each other, e.g. a loop's body run serially).

Candidates come from ``--from per_example`` (default: ``bench_per_example.candidates``, e.g.
``step``, ``clip``, ``dp``, ``norms``, ``sgs``) or ``--from curvature``
(``bench_curvature.candidates``: ``ggn``, ``ggn-mc``, ``kfac-factors``, ``kfac-step``, ...).

Run: ``python benchmarks/profile_ops.py [--from per_example|curvature] [--only mlp,cnn]
[--candidates step,clip,dp] [--calls 5] [--top 25]``. The milliseconds are single-run figures
for proportions, not for quoting as ratios.
"""

import argparse
import collections
import glob
import gzip
import json
import tempfile

import jax
from common import block, cnn_workload, lstm_workload, mlp_workload, random_batch, transformer_workload

WORKLOADS = {"mlp": mlp_workload, "cnn": cnn_workload, "lstm": lstm_workload, "transformer": transformer_workload}


def op_times(fn, args, calls: int) -> tuple[dict[str, float], dict[str, int]]:
    """Milliseconds per call spent in each traced event, and how often it ran per call."""
    for _ in range(3):
        block(fn(*args))
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(calls):
                block(fn(*args))
        (path,) = glob.glob(f"{log_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += e["dur"] / 1000 / calls
            count[e["name"]] += 1
    return dict(total), {k: v // calls for k, v in count.items()}


def _candidates(source, model, params, x, y, batch) -> dict:
    """``{name: (jitted f, extra args)}``, each called as ``f(params, x, y, key, *extra)``."""
    if source == "curvature":
        from bench_curvature import candidates

        return candidates(model, params, x, y)
    from bench_per_example import candidates

    return {name: (fn, ()) for name, fn in candidates(model, batch).items()}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="mlp,cnn")
    parser.add_argument("--candidates", default=None, help="default: step,clip,dp (per_example), ggn,kfac-factors "
                                                             "(curvature)")
    parser.add_argument("--from", dest="source", choices=("per_example", "curvature"), default="per_example")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        model, shape = WORKLOADS[name]()
        params, x, y = random_batch(model, shape)
        fns = _candidates(args.source, model, params, x, y, shape[0])
        default = "step,clip,dp" if args.source == "per_example" else "ggn,kfac-factors"
        for which in (args.candidates or default).split(","):
            fn, extra = fns[which]
            total, count = op_times(fn, (params, x, y, jax.random.PRNGKey(3), *extra), args.calls)
            ops = {k: v for k, v in total.items() if not k.startswith(("$", "ThunkExecutor", "PjitFunction",
                                                                          "CommonPjRt", "TfrtCpu"))}
            print(f"\n{name.upper()} {which}: {sum(ops.values()):.1f} ms a call in XLA ops "
                  f"(the executor's wall time {total.get('ThunkExecutor::Execute (wait for completion)', 0):.1f} ms)")
            for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"  {ms:7.2f} ms  ×{count[op]:<3d} {op}")


if __name__ == "__main__":
    main()
