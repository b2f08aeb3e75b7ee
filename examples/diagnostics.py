"""Training diagnostics: the digits MLP at a too small, a good and a too large learning rate.

Each run trains with ``fit(..., diagnostics="full")`` — α, the gradient noise scale and tests,
the GGN's trace, top eigenvalue and TIC, per-layer norms and update ratios, histograms, all
inside the jitted step (``fbp.diagnostics``) — then prints the median α over the last steps,
the gradient noise scale and the findings, each with the rule that fired.

Run: ``python examples/diagnostics.py [--dashboard out.png]``. Prints, per learning rate::

    lr 0.001: final loss 2.2xx   median α -0.7x   noise scale xx (batch 128)
      finding: step size too small: median α -0.75 over the last 200 steps ...   [median α < -0.5]

``--dashboard PATH`` saves each run's dashboard (``fbp.diagnostics.plot``) as PATH with the
learning rate in its name.
"""

import argparse
import pathlib

import jax
import numpy as np

from fbp import data, diagnostics, losses, nn, optim, train

RATES = {"too small": 0.001, "good": 0.3, "too large": 2.0}


def run(lr, args, ds):
    model = nn.Serial(nn.Dense(64), nn.Tanh(), nn.Dense(10))
    params = model.init(jax.random.PRNGKey(args.seed), ds.x_train[:1])
    return train.fit(model, losses.CategoricalCrossEntropy(from_logits=True), optim.sgd(lr), params, ds.x_train,
                     ds.y_train, key=jax.random.PRNGKey(args.seed + 1), epochs=args.epochs, batch_size=args.batch_size,
                     progress=False, scan_epochs=True, diagnostics="full", diagnostics_every=args.every)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dashboard", default=None)
    args = parser.parse_args(argv)
    ds = data.load_digits(seed=args.seed)
    for label, lr in RATES.items():
        result = run(lr, args, ds)
        record = result.diagnostics
        steps = sorted(record)[-args.window:]
        alpha = np.array([record[s].get("alpha", np.nan) for s in steps], dtype=float)
        trace = np.mean([record[s]["noise_scale"]["trace_cov"] for s in steps])
        signal = np.mean([record[s]["noise_scale"]["grad_sq"] for s in steps])
        print(f"lr {lr:g} ({label}): final loss {result.history['loss'][-1]:.3f}   median α "
              f"{np.nanmedian(alpha):.2f}   noise scale {trace / signal:.0f} (batch {args.batch_size})")
        for finding in diagnostics.findings(record, args.window):
            print(f"  finding [{finding.name}]: {finding.message}   [rule: {finding.rule}]")
        if args.dashboard:
            path = pathlib.Path(args.dashboard)
            diagnostics.plot(result, path.with_name(f"{path.stem}_lr{lr:g}{path.suffix or '.png'}"), args.window)


if __name__ == "__main__":
    main()
