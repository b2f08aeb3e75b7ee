"""fbp's CPU flag (``fbp.xla_cpu``) on and off: one training step of each CNN workload.

XLA reads its flags once per process, so the two settings cannot share a process: each run
starts one child process with the flag (fbp's default) and one with ``FBP_XLA_CPU_FLAGS=0``,
in alternating order, and each child times every workload's jitted SGD step (median of
interleaved rounds). Printed: each run's milliseconds and, over the runs, the range of
off / on (above 1: the flag is faster).

Workloads (fbp's step on each): the CNN of ``bench_cnn.py`` and 3C3D, Cockpit's network
(``bench_diagnostics.py``), both at batch 128; 3C3D's step again as four steps inside one
``lax.scan`` (time per step: XLA's CPU backend compiles a loop's body differently, and a
kernel-gradient convolution once ran 35-150× slower there than at the top level); the MLP of
``bench_mlp.py`` as a control without convolutions.

Run: ``python benchmarks/bench_xla_cpu_flags.py [--runs 3] [--rounds 7]``.
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys
import jax
sys.path.insert(0, {here!r})
import fbp
from fbp import losses
from common import interleaved, mlp_workload, random_batch, sgd
import bench_cnn, bench_diagnostics

loss = losses.CategoricalCrossEntropy(from_logits=True)
calls = {{}}
def add(name, model, shape):
    params, x, y = random_batch(model, shape)
    vg = fbp.value_and_grad(model, loss)
    step = jax.jit(lambda p, x, y: sgd(p, vg(p, x, y)[1]))
    calls[name] = lambda: step(params, x, y)
def add_scanned(name, model, shape, steps=4):
    params, x, y = random_batch(model, shape)
    vg = fbp.value_and_grad(model, loss)
    xs, ys = jax.numpy.stack([x] * steps), jax.numpy.stack([y] * steps)
    run = jax.jit(lambda p, xs, ys: jax.lax.scan(lambda p, b: (sgd(p, vg(p, *b)[1]), None), p, (xs, ys))[0])
    calls[name] = lambda: run(params, xs, ys)
    per_step[name] = steps
per_step = {{}}
add("cnn", bench_cnn.fbp_model(), (128, 28, 28, 1))
add("3c3d", *bench_diagnostics.c3d3())
add_scanned("3c3d, scanned", *bench_diagnostics.c3d3())
add("mlp", *mlp_workload())
times = interleaved(calls, rounds={rounds}, reps=2)
ms = {{k: v * 1e3 / per_step.get(k, 1) for k, v in times.items()}}
print(json.dumps({{"active": fbp.xla_cpu.active(), "ms": ms}}))
"""


def child(on: bool, rounds: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FBP_XLA_CPU_FLAGS"}
    if not on:
        env["FBP_XLA_CPU_FLAGS"] = "0"
    code = CHILD.format(here=os.path.dirname(os.path.abspath(__file__)), rounds=rounds)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    ratios = {}
    for run in range(args.runs):
        order = (True, False) if run % 2 == 0 else (False, True)
        got = {on: child(on, args.rounds) for on in order}
        if not got[True]["active"] or got[False]["active"]:
            print(f"  run {run + 1}: the flag did not take effect as expected (on: {got[True]['active']}, "
                  f"off: {got[False]['active']}) — a jaxlib without YNNPACK convolutions?")
        line = "   ".join(f"{k} {got[True]['ms'][k]:.1f} / {got[False]['ms'][k]:.1f} ms" for k in got[True]["ms"])
        print(f"  run {run + 1} (flag on / off): {line}")
        for k in got[True]["ms"]:
            ratios.setdefault(k, []).append(got[False]["ms"][k] / got[True]["ms"][k])
    for k, values in ratios.items():
        print(f"  {k}: off / on {min(values):.2f} – {max(values):.2f}")


if __name__ == "__main__":
    main()
