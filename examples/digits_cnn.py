"""A small CNN on the bundled digits as 8×8×1 images: convolutions, batch norm, dropout,
max pooling and augmentation, every backward rule hand-written.

Run: ``python examples/digits_cnn.py``; prints ``test accuracy: 0.9xx`` (≥ 0.985 expected).
"""

import argparse

import jax

from fbp import augment, data, losses, nn, optim, train


def build_model():
    def block(features):
        return [nn.Conv2D(features, 3, use_bias=False, kernel_init=nn.init.he_normal), nn.BatchNorm(), nn.ReLU()]

    return nn.Serial(*block(32), *block(32), nn.MaxPool2D(2),            # 8×8 -> 4×4
                     *block(64), *block(64), nn.MaxPool2D(2),            # 4×4 -> 2×2
                     nn.Flatten(), nn.Dropout(0.3), nn.Dense(128, kernel_init=nn.init.he_normal), nn.ReLU(),
                     nn.Dropout(0.3), nn.Dense(10))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    ds = data.load_digits(seed=args.seed, images=True)
    model = build_model()
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    steps = args.epochs * (len(ds.x_train) // 32 + 1)
    optimizer = optim.adamw(optim.warmup_cosine_decay_schedule(1e-4, 3e-3, 100, steps), weight_decay=1e-4)
    key = jax.random.PRNGKey(args.seed)
    params = model.init(key, ds.x_train[:1])
    result = train.fit(model, loss, optimizer, params, ds.x_train, ds.y_train, key=jax.random.fold_in(key, 1),
                       epochs=args.epochs, batch_size=32, scan_epochs=True, progress=not args.no_progress,
                       num_classes=10, augment=augment.random_crop(1))
    metrics = train.evaluate(model, loss, result.params, ds.x_test, ds.y_test, state=result.state)
    print(f"final training loss: {result.history['loss'][-1]:.4f}")
    print(f"test loss: {metrics['loss']:.4f}")
    print(f"test accuracy: {metrics['accuracy']:.3f}")
    return metrics["accuracy"]


if __name__ == "__main__":
    main()
