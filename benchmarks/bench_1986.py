"""The 1986 symmetry run (6-2-1, 5,000 full-batch sweeps with momentum): one ``lax.scan``
over all sweeps vs a Python loop calling a jitted step 5,000 times. Both use fbp's rules.
Run: ``python benchmarks/bench_1986.py``.
"""

import argparse
import os
import sys

import jax
from common import interleaved

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from symmetry_1986 import LOSS, MODEL, OPTIMIZER, PATTERNS, TARGETS  # noqa: E402

import fbp  # noqa: E402
from fbp import optim  # noqa: E402

SWEEPS = 5000


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    params = MODEL.init(jax.random.PRNGKey(2), PATTERNS)
    value_and_grad = fbp.value_and_grad(MODEL, LOSS)

    def step(params, state):
        value, grads = value_and_grad(params, PATTERNS, TARGETS)
        updates, state = OPTIMIZER.update(grads, state, params)
        return optim.apply_updates(params, updates), state, value

    step_jit = jax.jit(step)

    @jax.jit
    def scanned(params):
        def body(carry, _):
            p, s, v = step(*carry)
            return (p, s), v
        return jax.lax.scan(body, (params, OPTIMIZER.init(params)), None, length=SWEEPS)

    def loop():
        p, s = params, OPTIMIZER.init(params)
        for _ in range(SWEEPS):
            p, s, v = step_jit(p, s)
        return p

    times = interleaved({"python loop of jitted steps": loop, "one lax.scan": lambda: scanned(params)[0]},
                        rounds=args.rounds, reps=1)
    print(f"\n1986 symmetry net, {SWEEPS} sweeps  [{jax.devices()[0].platform}]")
    for name, t in times.items():
        print(f"  {name:<28} {t * 1e3:9.1f} ms   ({SWEEPS / t:,.0f} sweeps/s)")
    print(f"  ratio scan / loop: {times['one lax.scan'] / times['python loop of jitted steps']:.3f}")


if __name__ == "__main__":
    main()
