"""Every optimizer in fbp.optim on the same problem: an MLP on the bundled digits.

Same model, same initial weights, same mini-batches (same key); only the update rule
changes. Prints the final training loss and test accuracy of each and, with ``--plot PATH``,
draws the loss curves. Run: ``python examples/optimizers.py --plot optimizers.png``.
"""

import argparse

import jax

from fbp import data, losses, nn, optim, train

OPTIMIZERS = {
    "SGD": lambda: optim.sgd(0.1),
    "Momentum": lambda: optim.sgd(0.02, momentum=0.9),
    "Nesterov": lambda: optim.sgd(0.02, momentum=0.9, nesterov=True),
    "AdaGrad": lambda: optim.adagrad(0.05),
    "RMSProp": lambda: optim.rmsprop(1e-3),
    "Adam": lambda: optim.adam(1e-3),
    "AdamW": lambda: optim.adamw(1e-3, weight_decay=1e-2),
}


def compare(epochs: int = 20, seed: int = 0):
    ds = data.load_digits(seed=seed)
    model = nn.Serial(nn.Dense(64), nn.Tanh(), nn.Dense(10))
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    key = jax.random.PRNGKey(seed)
    params = model.init(key, ds.x_train)
    histories, accuracy = {}, {}
    for name, make in OPTIMIZERS.items():
        result = train.fit(model, loss, make(), params, ds.x_train, ds.y_train, key=jax.random.fold_in(key, 1),
                           epochs=epochs, batch_size=32, scan_epochs=True, progress=False)
        histories[name] = result.history["loss"]
        accuracy[name] = train.evaluate(model, loss, result.params, ds.x_test, ds.y_test)["accuracy"]
    return histories, accuracy


def plot(histories, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, h in histories.items():
        ax.semilogy(range(1, len(h) + 1), h, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("digits MLP: one problem, every optimizer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args(argv)
    histories, accuracy = compare(args.epochs, args.seed)
    print(f"{'optimizer':<10} {'loss after 1 epoch':>19} {f'after {args.epochs}':>10} {'test accuracy':>14}")
    for name, h in histories.items():
        print(f"{name:<10} {h[0]:>19.4f} {h[-1]:>10.4f} {accuracy[name]:>14.3f}")
    if args.plot:
        plot(histories, args.plot)
        print(f"loss curves written to {args.plot}")
    return histories, accuracy


if __name__ == "__main__":
    main()
