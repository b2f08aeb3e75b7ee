"""K-FAC's factor average: bias-corrected (fbp's default) against the plain average started at
the first batch (``debias=False``), in steps to a loss target.

Issue 30 found fbp's K-FAC needing more steps than kfac-jax on a digits deep autoencoder, and
traced it to the factor average: the plain average keeps the first batch's noisy factors at
weight ``decay^t`` for tens of steps, where kfac-jax normalises its weighted average by the
accumulated weight. This script counts the steps each average needs to bring the training loss
(a running mean over 10 steps) below a target, over several seeds, with the settings of that
comparison: factored damping 0.1, factors every step, eigendecompositions every 10 steps, one
Monte-Carlo sample, SGD with momentum 0.9 on the preconditioned gradient.

Networks: the digits deep autoencoder 64-128-64-16-64-128-64 (tanh, MSE, batch 128), and the
digits MLP classifier 64-128-10 (cross-entropy). Steps are counted, not timed: the machine's
noise does not enter. (kfac-jax is not run here: see ``docs/performance.md``.)

Run: ``python benchmarks/bench_kfac_average.py [--seeds 5] [--steps 1500]``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fbp import data, kfac, losses, nn, optim


def _autoencoder():
    return nn.Serial(nn.Dense(128), nn.Tanh(), nn.Dense(64), nn.Tanh(), nn.Dense(16), nn.Tanh(), nn.Dense(64),
                     nn.Tanh(), nn.Dense(128), nn.Tanh(), nn.Dense(64)), losses.MSE()


def _classifier():
    return nn.Serial(nn.Dense(128), nn.Tanh(), nn.Dense(10)), losses.CategoricalCrossEntropy(from_logits=True)


WORKLOADS = {"autoencoder": (_autoencoder, 0.05, 0.012), "mlp": (_classifier, 0.05, 0.005)}  # (build, lr, target)


def steps_to_target(build, lr, target, seed, debias, max_steps, batch=128):
    ds = data.load_digits(0.3, seed=0)
    x = jnp.asarray(ds.x_train)
    model, loss = build()
    y = x if isinstance(loss, losses.MSE) else jnp.asarray(ds.y_train)
    params = model.init(jax.random.PRNGKey(seed), x[:1])
    k = kfac.kfac(model, loss, optim.sgd(lr, momentum=0.9), damping=0.1, damping_mode="factored", inverse_every=10,
                  mc_samples=1, debias=debias)
    state = k.init(params, x[:batch], y[:batch])
    step = jax.jit(k.step)
    rng = np.random.default_rng(seed)
    losses_seen = []
    for i in range(max_steps):
        idx = rng.choice(len(x), batch, replace=False)
        params, state, value = step(params, state, x[idx], y[idx], key=jax.random.PRNGKey(1000 * seed + i))
        losses_seen.append(float(value))
        if i >= 9 and np.mean(losses_seen[-10:]) < target:
            return i + 1, losses_seen
    return None, losses_seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--only", default="autoencoder,mlp")
    args = parser.parse_args()
    for name in args.only.split(","):
        build, lr, target = WORKLOADS[name]
        print(f"\n{name}: steps until the mean loss of the last 10 steps < {target} (lr {lr}, momentum 0.9)")
        for debias in (True, False):
            found = [steps_to_target(build, lr, target, seed, debias, args.steps)[0] for seed in range(args.seeds)]
            reached = [s for s in found if s is not None]
            label = "bias-corrected (default)" if debias else "plain, from the first batch"
            print(f"  {label:28} per seed {found}   mean {np.mean(reached) if reached else float('nan'):.1f} "
                  f"({len(reached)}/{len(found)} reached)")


if __name__ == "__main__":
    main()
