"""Backpropagation, feedback alignment, sign symmetry and direct feedback alignment on digits.

The same network and the same initial weights, trained four ways; only the backward pass differs
(``fbp.credit``, one call each). Telemetry from the same pass measures, per layer, the angle
between the update each rule makes and the true gradient (Lillicrap et al., 2016, Fig. 2).

Run: ``python examples/feedback_alignment.py [--cnn]``. Prints one line per method::

    BP: test accuracy 0.9xx
    FA: test accuracy 0.9xx   angle to the gradient (degrees) at the last epoch: 0: 5x.x  2: 4x.x  4: 0.0

For scale, biotorch's LeNet on MNIST reaches top-1 errors of 0.84 % (BP), 1.91 % (FA), 1.71 % (DFA),
0.83 % (uSF); digits is a smaller, easier task with a smaller network.
"""

import argparse

import jax

from fbp import credit, data, losses, nn, optim, train


def mlp():
    he = nn.init.he_normal
    return nn.Serial(nn.Dense(256, kernel_init=he), nn.ReLU(), nn.Dense(128, kernel_init=he), nn.ReLU(),
                     nn.Dense(10))


def cnn():
    he = nn.init.he_normal
    return nn.Serial(nn.Reshape((8, 8, 1)), nn.Conv2D(16, 3, kernel_init=he), nn.ReLU(), nn.MaxPool2D(2),
                     nn.Flatten(), nn.Dense(64, kernel_init=he), nn.ReLU(), nn.Dense(10))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cnn", action="store_true", help="a small convolutional network instead of the MLP")
    args = parser.parse_args(argv)

    ds = data.load_digits(seed=args.seed)
    model = cnn() if args.cnn else mlp()
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    key = jax.random.PRNGKey(args.seed)
    params = model.init(key, ds.x_train)  # every method starts from these weights
    rules = {
        "BP": model,
        "FA": credit.feedback_alignment(model, seed=args.seed),
        "uSF": credit.sign_symmetry(model),
        "DFA": credit.direct_feedback_alignment(model, ds.x_train[:1], seed=args.seed),
    }
    results = {}
    for name, rule in rules.items():
        result = train.fit(rule, loss, optim.adam(1e-3), params, ds.x_train, ds.y_train,
                           key=jax.random.fold_in(key, 1), epochs=args.epochs, batch_size=32, scan_epochs=True,
                           progress=False, telemetry=name != "BP")
        accuracy = train.evaluate(rule, loss, result.params, ds.x_test, ds.y_test, state=result.state)["accuracy"]
        line = f"{name}: test accuracy {accuracy:.3f}"
        if result.telemetry:
            angles = {path: stats["alignment_angle"][-1] for path, stats in result.telemetry.items()
                      if "alignment_angle" in stats}
            line += "   angle to the gradient (degrees) at the last epoch: " + "  ".join(
                f"{path}: {angle:.1f}" for path, angle in angles.items())
        print(line, flush=True)
        results[name] = (accuracy, result)
    return results


if __name__ == "__main__":
    main()
