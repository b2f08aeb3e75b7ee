"""MSE vs MAE vs Huber on scikit-learn's diabetes data with injected outliers.

10% of the *training* targets are corrupted by a large positive shift; the test set is
clean. Squared error chases the outliers; absolute error and Huber's loss (quadratic near 0,
linear beyond δ) largely ignore them. Run: ``python examples/regression_losses.py``.
"""

import argparse

import jax
import numpy as np

from fbp import data, losses, nn, optim, train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outlier-fraction", type=float, default=0.1)
    parser.add_argument("--shift", type=float, default=8.0, help="outlier shift, in target standard deviations")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = data.load_diabetes(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    y_train = ds.y_train.copy()
    corrupt = rng.choice(len(y_train), int(args.outlier_fraction * len(y_train)), replace=False)
    y_train[corrupt] += args.shift
    print(f"diabetes: {len(y_train)} training targets, {len(corrupt)} shifted by +{args.shift} std; "
          f"test set clean ({len(ds.y_test)} examples)")

    model = nn.Dense(1)  # linear regression: the loss is the only difference between the runs
    results = {}
    for name, loss in (("MSE", losses.MSE()), ("MAE", losses.MAE()), ("Huber(delta=1)", losses.Huber(delta=1.0))):
        key = jax.random.PRNGKey(args.seed)
        fit = train.fit(model, loss, optim.adam(0.05), model.init(key, ds.x_train), ds.x_train, y_train, key=key,
                        epochs=args.epochs, batch_size=None, progress=False)
        error = (np.asarray(model.apply(fit.params, ds.x_test)) - ds.y_test) * ds.info["y_std"]
        results[name] = (np.abs(error).mean(), np.sqrt((error**2).mean()))
    print(f"\n{'training loss':<16} {'test MAE':>9} {'test RMSE':>10}   (disease-progression units)")
    for name, (mae, rmse) in results.items():
        print(f"{name:<16} {mae:>9.2f} {rmse:>10.2f}")
    best = min(results, key=lambda k: results[k][0])
    print(f"\nmost robust to the outliers here: {best}")
    return results


if __name__ == "__main__":
    main()
