"""K-FAC against Adam and SGD on the bundled digits: an MLP and a CNN, the same mini-batches for
every method. K-FAC's factors and the gradient come from one forward pass and its backward (``fbp.kfac``).

Prints one line per model and method, e.g.
``MLP K-FAC: test accuracy 0.9xx, steps to training loss 0.1: N``, and plots the training loss
against steps and against wall time with ``--plot PATH`` (nothing is written by default).
Run: ``python examples/second_order.py``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fbp import data, kfac, losses, nn, optim, train

LOSS = losses.CategoricalCrossEntropy(from_logits=True)
TARGET = 0.1


def models():
    return {
        "MLP": (nn.Serial(nn.Dense(64), nn.Tanh(), nn.Dense(10)), False),
        "CNN": (nn.Serial(nn.Conv2D(16, 3), nn.ReLU(), nn.MaxPool2D(2), nn.Conv2D(32, 3), nn.ReLU(), nn.MaxPool2D(2),
                          nn.Flatten(), nn.Dense(10)), True),
    }


def methods(model):
    return {
        "K-FAC": lambda: kfac.kfac(model, LOSS, optim.sgd(0.05, momentum=0.9), damping=0.1, inverse_every=10),
        "Adam": lambda: optim.adam(1e-3),
        "SGD": lambda: optim.sgd(0.05, momentum=0.9),
    }


def run(model, make, x, y, batches, seed):
    """Train on ``batches`` (index arrays); ``(params, losses per step, seconds after each step)``."""
    params = model.init(jax.random.key(seed), x[:1])
    method = make()
    if isinstance(method, kfac.KFAC):
        state = method.init(params, x[batches[0]], y[batches[0]])
        step = jax.jit(method.step)
    else:
        state = method.init(params)
        plain = jax.jit(train.make_step(model, LOSS, method, jit=False))
        step = lambda p, s, xb, yb, key: plain(p, s, xb, yb)  # noqa: E731
    key = jax.random.key(seed + 1)
    jax.block_until_ready(step(params, state, x[batches[0]], y[batches[0]], key=key))  # compile first
    values, clock, start = [], [], time.perf_counter()
    for i, idx in enumerate(batches):
        params, state, value = step(params, state, x[idx], y[idx], key=jax.random.fold_in(key, i))
        values.append(float(value))  # waits for the step: the clock is honest
        clock.append(time.perf_counter() - start)
    return params, np.array(values), np.array(clock)


def steps_to(values, target, window=10):
    """The first step at which the mean of the last ``window`` batch losses is at most ``target``."""
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    hit = np.nonzero(smooth <= target)[0]
    return int(hit[0]) + window if hit.size else None


def compare(steps=300, batch_size=128, seed=0, which=("MLP", "CNN")):
    results = {}
    for name, (model, images) in models().items():
        if name not in which:
            continue
        ds = data.load_digits(seed=seed, images=images)
        x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
        rng = np.random.default_rng(seed)
        batches = [rng.choice(len(x), batch_size, replace=False) for _ in range(steps)]
        for method, make in methods(model).items():
            params, values, clock = run(model, make, x, y, batches, seed)
            accuracy = train.evaluate(model, LOSS, params, ds.x_test, ds.y_test)["accuracy"]
            results[name, method] = {"loss": values, "time": clock, "accuracy": float(accuracy),
                                     "steps": steps_to(values, TARGET)}
    return results


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for name, _ in results})
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for (model, method), r in results.items():
            if model == name:
                axes[row, 0].semilogy(np.arange(1, len(r["loss"]) + 1), r["loss"], label=method, lw=1)
                axes[row, 1].semilogy(r["time"], r["loss"], label=method, lw=1)
        axes[row, 0].set(xlabel="step", ylabel="training batch loss", title=f"{name}: loss against steps")
        axes[row, 1].set(xlabel="wall time after compilation (s)", title=f"{name}: loss against time")
        for ax in axes[row]:
            ax.axhline(TARGET, color="grey", lw=0.5, ls="--")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="MLP,CNN", help="comma-separated: MLP, CNN")
    parser.add_argument("--plot", metavar="PATH", help="write the loss curves to this PNG (none by default)")
    parser.add_argument("--no-plot", action="store_true", help="kept for old command lines: no plot is the default")
    args = parser.parse_args(argv)
    results = compare(args.steps, args.batch_size, args.seed, tuple(args.models.split(",")))
    for (name, method), r in results.items():
        reached = r["steps"] if r["steps"] is not None else f"not reached in {args.steps}"
        print(f"{name} {method}: test accuracy {r['accuracy']:.3f}, steps to training loss {TARGET}: {reached}, "
              f"{r['time'][-1]:.2f} s")
    if args.plot and not args.no_plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
