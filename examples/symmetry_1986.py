"""Rumelhart, Hinton & Williams (1986), "Learning representations by back-propagating errors":
detecting mirror symmetry with a 6-2-1 network.

All 64 six-bit patterns; the target is 1 when a pattern is its own mirror image (8 of 64).
Full-batch gradient descent ("sweeps") on E = ½ Σ (y − d)² with momentum:
Δw(t) = −ε ∂E/∂w + α Δw(t−1), ε = 0.1, α = 0.9; initial weights uniform in [−0.3, 0.3].
Many seeds train at once (``jax.vmap`` over seeds, ``lax.scan`` over sweeps).

The paper's solution: the two hidden units' weights are mirror images of opposite sign, with
magnitudes in the ratio 1 : 2 : 4 from the middle outward. Run:
``python examples/symmetry_1986.py [--seeds 20 --sweeps 5000]``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import fbp
from fbp import losses, nn, optim

PATTERNS = jnp.array([[(i >> (5 - b)) & 1 for b in range(6)] for i in range(64)], jnp.float32)
TARGETS = jnp.all(PATTERNS == PATTERNS[:, ::-1], axis=1, keepdims=True).astype(jnp.float32)

MODEL = nn.Serial(nn.Dense(2, kernel_init=nn.init.uniform(0.3), bias_init=nn.init.uniform(0.3)), nn.Sigmoid(),
                  nn.Dense(1, kernel_init=nn.init.uniform(0.3), bias_init=nn.init.uniform(0.3)), nn.Sigmoid())
# Σ (y − d)² over all cases is MSE with reduction="sum" (one output unit); E is half of it.
LOSS = losses.MSE(reduction="sum")
OPTIMIZER = optim.chain(optim.scale(0.5), optim.sgd(learning_rate=0.1, momentum=0.9))  # ½: ∂E = ½ ∂Σ(y−d)²


def run(seed: int, sweeps: int):
    """Train one network; returns final params, E per sweep and the max |y − d| per sweep."""
    params = MODEL.init(jax.random.PRNGKey(seed), PATTERNS)
    value_and_grad = fbp.value_and_grad(MODEL, LOSS)

    def sweep(carry, _):
        params, state = carry
        value, grads = value_and_grad(params, PATTERNS, TARGETS)
        updates, state = OPTIMIZER.update(grads, state, params)
        worst = jnp.max(jnp.abs(MODEL.apply(params, PATTERNS) - TARGETS))
        return (optim.apply_updates(params, updates), state), (0.5 * value, worst)

    (params, _), (energy, worst) = jax.lax.scan(sweep, (params, OPTIMIZER.init(params)), None, length=sweeps)
    return params, energy, worst


def first_below(worst, tolerance):
    hits = np.nonzero(np.asarray(worst) < tolerance)[0]
    return int(hits[0]) + 1 if hits.size else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Mirror symmetry, Rumelhart, Hinton & Williams (1986)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sweeps", type=int, default=5000)
    args = parser.parse_args(argv)

    params, energy, worst = jax.jit(jax.vmap(lambda s: run(s, args.sweeps)))(jnp.arange(args.seeds))
    solved = []
    print(f"{'seed':>4} {'sweeps to all correct (|y-d|<0.5)':>34} {'to |y-d|<0.2':>13} {'final E':>9}")
    for s in range(args.seeds):
        correct, tight = first_below(worst[s], 0.5), first_below(worst[s], 0.2)
        if tight is not None:
            solved.append(s)
        print(f"{s:>4} {correct if correct else '-':>34} {tight if tight else '-':>13} {float(energy[s, -1]):>9.4f}")
    print(f"\n{len(solved)} of {args.seeds} seeds solve the task (every output within 0.2 of its target) "
          f"within {args.sweeps} sweeps; the paper reports 1,425 sweeps for its run.")
    if solved:
        s = solved[0]
        w = np.asarray(params[0]["w"][s]).T  # (hidden unit, input position)
        print(f"\nhidden weights of seed {s} (input positions 1..6); magnitudes of one half, smallest = 1:")
        for unit, row in enumerate(w):
            halves = np.sort(np.abs(row[:3]))
            print(f"  hidden {unit + 1}: " + " ".join(f"{v:+7.2f}" for v in row)
                  + "   ratio " + " : ".join(f"{v / halves[0]:.2f}" for v in halves)
                  + f"   mirror sum {np.abs(row + row[::-1]).max():.1e}")
        print("  (mirror sum ≈ 0: mirror positions carry equal magnitudes of opposite sign; the paper: 1 : 2 : 4)")
    return len(solved)


if __name__ == "__main__":
    main()
