"""Rematerialisation: XLA temp memory and time of the gradient, fbp's ``nn.Remat`` against the
plain model and against ``jax.checkpoint`` of the same pure-JAX model.

Workload: 8 blocks of 4 × (Dense(256) + Tanh), batch 2048, input 256, Dense(10) head,
softmax cross-entropy, float32. Candidates, each one jitted gradient on the same weights:

* ``fbp``: ``fbp.value_and_grad`` of the plain model; ``fbp-remat``: every block in ``nn.Remat``;
* ``jax``: ``jax.value_and_grad`` of the same model in plain JAX; ``jax-checkpoint``: every
  block wrapped in ``jax.checkpoint``.

Run: ``python benchmarks/bench_remat.py [--runs K]`` — temp memory (deterministic) and the
median time per call of each run, then ratio ranges over runs.
"""

import argparse

import jax
import jax.numpy as jnp
from common import ratio_runs, temp_bytes

import fbp
from fbp import losses, nn

BLOCKS, DEPTH, WIDTH, BATCH = 8, 4, 256, 2048
CCE = losses.CategoricalCrossEntropy(from_logits=True)


def model(wrap):
    def block():
        return nn.Serial(*[layer for _ in range(DEPTH) for layer in (nn.Dense(WIDTH), nn.Tanh())])

    return nn.Serial(*[wrap(block()) for _ in range(BLOCKS)], nn.Dense(10))


def jax_loss(checkpointed):
    def block(p, h):
        for layer in p:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return h

    run = jax.checkpoint(block) if checkpointed else block

    def loss(params, x, y):
        h = x
        for p in params[:-1]:
            h = run(p, h)
        logits = h @ params[-1]["w"] + params[-1]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return loss


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, WIDTH))
    y = jax.random.randint(jax.random.PRNGKey(1), (BATCH,), 0, 10)
    plain = model(lambda b: b)
    params = plain.init(jax.random.PRNGKey(2), x)
    remat_params = tuple({"block": p} for p in params[:-1]) + (params[-1],)
    jax_params = tuple(tuple(p[i] for i in range(0, 2 * DEPTH, 2)) for p in params[:-1]) + (params[-1],)
    fns = {
        "fbp": (jax.jit(fbp.value_and_grad(plain, CCE)), params),
        "fbp-remat": (jax.jit(fbp.value_and_grad(model(nn.Remat), CCE)), remat_params),
        "jax": (jax.jit(jax.value_and_grad(jax_loss(False))), jax_params),
        "jax-checkpoint": (jax.jit(jax.value_and_grad(jax_loss(True))), jax_params),
    }
    values = {k: float(f(p, x, y)[0]) for k, (f, p) in fns.items()}
    print(f"{BLOCKS} blocks of {DEPTH} x (Dense({WIDTH}) + Tanh), batch {BATCH}  [{jax.devices()[0].platform}]")
    print("  loss: " + "  ".join(f"{k} {v:.6f}" for k, v in values.items()))
    memory = {k: temp_bytes(f, p, x, y) for k, (f, p) in fns.items()}
    print("  XLA temp memory (MiB): " + "  ".join(f"{k} {m / 2**20:.1f}" for k, m in memory.items() if m))
    if memory["fbp"]:
        print(f"  temp memory fbp-remat / fbp: {memory['fbp-remat'] / memory['fbp']:.2f}   "
              f"jax-checkpoint / jax: {memory['jax-checkpoint'] / memory['jax']:.2f}")
    calls = {k: (lambda f=f, p=p: f(p, x, y)) for k, (f, p) in fns.items()}
    ratios = ratio_runs(calls, ["fbp-remat / fbp", "jax-checkpoint / jax", "fbp / jax"], args.runs, args.rounds,
                        args.reps)
    for key, v in ratios.items():
        print(f"  time {key}: {min(v):.2f} – {max(v):.2f}")


if __name__ == "__main__":
    main()
