"""Training throughput of ``fbp.train.fit`` on the digits MLP vs a hand-rolled pure-JAX loop.

The peer is what a JAX user writes by hand: a jitted step with ``jax.value_and_grad`` of a
pure-jnp MLP, the same optimizer (``fbp.optim.adam`` — no optax here), the same per-epoch
shuffling and mini-batches of 32, one Python-level call per step. fit runs both ways: one
dispatch per step, and one ``lax.scan`` per epoch. Run: ``python benchmarks/bench_fit.py``.
"""

import argparse

import jax
import jax.numpy as jnp
from common import interleaved

from fbp import data, losses, nn, optim, train

EPOCHS, BATCH = 5, 32


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    ds = data.load_digits()
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    n = x.shape[0]
    model = nn.Serial(nn.Dense(128), nn.ReLU(), nn.Dense(64), nn.ReLU(), nn.Dense(10))
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    params = model.init(jax.random.PRNGKey(0), x)
    key = jax.random.PRNGKey(1)

    fit_opt = optim.adam(1e-3)  # made once, as a user would: fit's compiled step is cached per optimizer

    def run_fit(scan):
        return lambda: train.fit(model, loss, fit_opt, params, x, y, key=key, epochs=EPOCHS,
                                 batch_size=BATCH, progress=False, scan_epochs=scan).params

    def jax_loss(p, xb, yb):
        h = xb
        for layer in (p[0], p[2]):
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        logits = h @ p[4]["w"] + p[4]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    opt = optim.adam(1e-3)

    @jax.jit
    def jax_step(p, state, idx):
        value, grads = jax.value_and_grad(jax_loss)(p, x[idx], y[idx])
        updates, state = opt.update(grads, state, p)
        return optim.apply_updates(p, updates), state, value

    def run_jax():
        p, state = params, opt.init(params)
        for epoch in range(EPOCHS):
            for idx in data.batch_indices(n, BATCH, key=jax.random.fold_in(key, epoch)):
                p, state, _ = jax_step(p, state, idx)
        return p

    times = interleaved({"hand-rolled jax.grad loop": run_jax, "fbp fit (step per call)": run_fit(False),
                         "fbp fit (scan per epoch)": run_fit(True)}, rounds=args.rounds, reps=1)
    print(f"\ndigits MLP 64-128-64-10, Adam, batch {BATCH}, {EPOCHS} epochs of {n} examples  "
          f"[{jax.devices()[0].platform}]")
    base = times["hand-rolled jax.grad loop"]
    for name, t in times.items():
        print(f"  {name:<28} {EPOCHS * n / t:>10.0f} examples/s   time ratio vs hand-rolled {t / base:.3f}")


if __name__ == "__main__":
    main()
