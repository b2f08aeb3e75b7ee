"""A binarised MLP on digits: ±1 weights and ±1 activations, trained by straight-through estimators.

``nn.QuantizeWeights(nn.Dense(256), nn.Sign())`` runs each hidden Dense with ``sign(w)`` and passes
the kernel's gradient straight through to the real-valued ``w`` the optimizer keeps
(BinaryConnect, Courbariaux et al., 2015); ``nn.Sign()`` binarises the activations with the
hardtanh straight-through backward ``d_x = d_y · 1{|x| <= 1}`` (BinaryNet, Hubara et al., 2016).
The real weights never leave the optimizer; the forward pass sees only signs.

Run: ``python examples/binary_mlp.py``. Prints::

    real-valued: test accuracy 0.9xx
    binary: test accuracy 0.9xx   (hidden weights and activations exactly ±1: True)
"""

import argparse

import jax
import jax.numpy as jnp

from fbp import data, losses, nn, optim, train


def binary_mlp(width):
    binary = lambda: nn.QuantizeWeights(nn.Dense(width, use_bias=False), nn.Sign(ste="identity"))  # noqa: E731
    return nn.Serial(binary(), nn.BatchNorm(), nn.Sign(), binary(), nn.BatchNorm(), nn.Sign(), nn.Dense(10))


def real_mlp(width):
    return nn.Serial(nn.Dense(width), nn.BatchNorm(), nn.Tanh(), nn.Dense(width), nn.BatchNorm(), nn.Tanh(),
                     nn.Dense(10))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    ds = data.load_digits(seed=args.seed)
    loss = losses.CategoricalCrossEntropy(from_logits=True)
    key = jax.random.PRNGKey(args.seed)
    results = {}
    for name, model in (("real-valued", real_mlp(args.width)), ("binary", binary_mlp(args.width))):
        params = model.init(key, ds.x_train)
        result = train.fit(model, loss, optim.adam(3e-3), params, ds.x_train, ds.y_train,
                           key=jax.random.fold_in(key, 1), epochs=args.epochs, batch_size=32, scan_epochs=True,
                           progress=False)
        accuracy = train.evaluate(model, loss, result.params, ds.x_test, ds.y_test, state=result.state)["accuracy"]
        line = f"{name}: test accuracy {accuracy:.3f}"
        if name == "binary":  # what the forward pass actually computes with
            hidden = nn.Serial(*model.layers[:3])
            h = hidden.apply(result.params[:3], jnp.asarray(ds.x_test), state=result.state[:3])
            w = model.layers[0].quantizer({}, result.params[0]["w"])
            binary = bool(jnp.all(jnp.abs(h) == 1) and jnp.all(jnp.abs(w) == 1))
            line += f"   (hidden weights and activations exactly ±1: {binary})"
        print(line, flush=True)
        results[name] = accuracy
    return results


if __name__ == "__main__":
    main()
