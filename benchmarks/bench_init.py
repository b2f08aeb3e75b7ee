"""A first, eager ``init`` of every layer and model of the catalogue, three ways, each in a
fresh process (what is timed is mostly compilation, which a warm process would not repeat):

* ``bucketed``: as fbp draws, a prefix of a power-of-two-long draw (``nn.init.draw_by_length``);
* ``one program per shape``: each parameter drawn directly by ``jax.random`` (as before);
* ``jit per model``: ``jax.jit(model.init)``, one compiled program per model.

The three give the same parameters up to the last bit that a fused ``jit`` program may round
differently. Run: ``python benchmarks/bench_init.py [--rounds 3]``; it prints the median time
of each and the ratios to ``bucketed``, over rounds that interleave the three.
"""

import argparse
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time
import jax
from fbp import catalog
from fbp.nn import init
mode = sys.argv[1]
if mode == "direct":
    init._LONGEST_BUCKET = 0  # every draw longer than the longest bucket: drawn as asked
cases = [(l, s) for l, s in catalog.layers()] + [(l, s) for l, s, o in catalog.contextual_layers()
        if "vocab" not in o] + [(m, s) for m, _, s, _ in catalog.models()]
xs = [catalog._normal(jax.random.PRNGKey(i), s) for i, (_, s) in enumerate(cases)]
start = time.perf_counter()
for (layer, _), x in zip(cases, xs):
    jax.block_until_ready(jax.jit(layer.init)(jax.random.PRNGKey(0), x) if mode == "jit"
                          else layer.init(jax.random.PRNGKey(0), x))
print(len(cases), time.perf_counter() - start)
"""

MODES = {"bucketed": "bucketed", "one program per shape": "direct", "jit per model": "jit"}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    times = {name: [] for name in MODES}
    count = 0
    for _ in range(args.rounds):
        for name, mode in MODES.items():
            out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
            count, seconds = out.stdout.split()
            times[name].append(float(seconds))
    print(f"\nfirst eager init of {count} catalogue layers and models, {args.rounds} rounds  "
          f"[{time.strftime('%Y-%m-%d')}]")
    base = statistics.median(times["bucketed"])
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["bucketed"])]
        print(f"  {name:<24} median {statistics.median(ts):6.2f} s   / bucketed: "
              f"{statistics.median(ts) / base:5.2f}  (per round {min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
