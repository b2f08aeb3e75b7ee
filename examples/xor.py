"""XOR with a 2-2-1 sigmoid network, trained by plain gradient descent on squared error.

The five steps of backpropagation, written out: forward pass, loss, backward pass (fbp's
hand-written rules), parameter update, iterate. Run: ``python examples/xor.py``.
"""

import argparse

import jax
import jax.numpy as jnp

import fbp
from fbp import losses, nn

X = jnp.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y = jnp.array([[0.0], [1.0], [1.0], [0.0]])


def train(seed: int = 0, epochs: int = 5000, learning_rate: float = 2.0):
    model = nn.Serial(nn.Dense(2, kernel_init=nn.init.normal(1.0)), nn.Sigmoid(),
                      nn.Dense(1, kernel_init=nn.init.normal(1.0)), nn.Sigmoid())
    loss = losses.MSE()
    params = model.init(jax.random.PRNGKey(seed), X)
    value_and_grad = fbp.value_and_grad(model, loss)

    def step(params, _):
        value, grads = value_and_grad(params, X, Y)                          # forward, loss, backward
        params = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)  # update
        return params, value

    params, history = jax.jit(lambda p: jax.lax.scan(step, p, None, length=epochs))(params)  # iterate
    return model, params, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args(argv)
    model, params, history = train(args.seed, args.epochs, args.lr)
    out = model.apply(params, X)
    print(f"loss: epoch 1 {float(history[0]):.4f} -> epoch {args.epochs} {float(history[-1]):.6f}")
    print(" x1  x2 | target | output | rounded")
    for (x1, x2), t, o in zip(X.tolist(), Y[:, 0].tolist(), out[:, 0].tolist()):
        print(f"  {int(x1)}   {int(x2)} |   {int(t)}    | {o:.4f} |   {round(o)}")
    learned = bool(jnp.all(jnp.round(out) == Y))
    print("XOR learned" if learned else "XOR not learned from this seed (a local minimum); try another --seed")
    return learned


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
