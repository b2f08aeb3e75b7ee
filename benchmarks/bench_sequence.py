"""Sequence models, one jitted SGD step each: fbp vs JAX's autodiff of pure-jnp equivalents.

* LSTM: T=64, B=64, input 32, hidden 256, last step -> Dense 10, cross-entropy. Two JAX peers:
  the input projection inside the scan (the textbook cell — the fastest pure-JAX form found
  here, so the baseline) and hoisted out of it as one matmul for all steps.
* Transformer block: T=128, B=16, d=256, 4 heads, MLP 1024 (pre-LN, GELU), mean over time ->
  Dense 10, cross-entropy.

Run: ``python benchmarks/bench_sequence.py [--only lstm|transformer]``.
"""

import argparse

import jax
import jax.numpy as jnp
from common import interleaved, report, temp_bytes

import fbp
from fbp import losses, nn

LR = 1e-2
LOSS = losses.CategoricalCrossEntropy(from_logits=True)


def ce(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def sgd(p, g):
    return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)


def fbp_step_fn(model):
    vg = fbp.value_and_grad(model, LOSS)

    @jax.jit
    def step(p, x, y):
        value, grads = vg(p, x, y)
        return sgd(p, grads), value

    return step


# --------------------------------------------------------------------------- LSTM
def lstm_jax(p, x, hoisted):
    w_x, w_h, b = p["w_x"], p["w_h"], p["b"]
    hd = w_h.shape[0]
    xs = jnp.swapaxes(x, 0, 1)
    inputs = jnp.einsum("tbf,fg->tbg", xs, w_x) + b if hoisted else xs

    def cell(carry, inp):
        h, c = carry
        a = (inp if hoisted else inp @ w_x + b) + h @ w_h
        i, f, g, o = jax.nn.sigmoid(a[:, :hd]), jax.nn.sigmoid(a[:, hd:2 * hd]), jnp.tanh(a[:, 2 * hd:3 * hd]), \
            jax.nn.sigmoid(a[:, 3 * hd:])
        c = f * c + i * g
        h = o * jnp.tanh(c)
        return (h, c), None

    zeros = jnp.zeros((x.shape[0], hd), x.dtype)
    (h, _), _ = jax.lax.scan(cell, (zeros, zeros), inputs)
    return h


def lstm_bench(rounds):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 64, 32))
    y = jax.random.randint(jax.random.PRNGKey(1), (64,), 0, 10)
    model = nn.Serial(nn.LSTM(256), nn.LastStep(), nn.Dense(10))
    params = model.init(jax.random.PRNGKey(2), x)

    def make_jax(hoisted):
        def loss(p, x, y):
            h = lstm_jax(p[0], x, hoisted)
            return ce(h @ p[2]["w"] + p[2]["b"], y)

        @jax.jit
        def step(p, x, y):
            value, grads = jax.value_and_grad(loss)(p, x, y)
            return sgd(p, grads), value

        return step

    steps = {"jax (projection in scan)": make_jax(False), "jax (projection hoisted)": make_jax(True),
             "fbp": fbp_step_fn(model)}
    values = [float(s(params, x, y)[1]) for s in steps.values()]
    assert max(values) - min(values) < 1e-4 * abs(values[0]), values
    times = interleaved({n: (lambda s=s: s(params, x, y)) for n, s in steps.items()}, rounds, 3)
    memory = {n: temp_bytes(s, params, x, y) for n, s in steps.items()}
    report("LSTM T=64 B=64 in=32 hidden=256 -> Dense 10, one jitted SGD step", times, memory,
           baseline="jax (projection in scan)")


# --------------------------------------------------------------------------- transformer
def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def block_jax(p, x, heads=4):
    b, t, d = x.shape
    k = d // heads
    a = p["attention"]
    h = layer_norm(x, p["ln1"])
    q, kk, v = ((h @ a[f"w_{n}"] + a[f"b_{n}"]).reshape(b, t, heads, k) for n in "qkv")
    s = jnp.einsum("bqhk,bjhk->bhqj", q, kk) / jnp.sqrt(k)
    o = jnp.einsum("bhqj,bjhk->bqhk", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
    x = x + o @ a["w_o"] + a["b_o"]
    m = layer_norm(x, p["ln2"])
    m = jax.nn.gelu(m @ p["mlp_in"]["w"] + p["mlp_in"]["b"], approximate=True)
    return x + m @ p["mlp_out"]["w"] + p["mlp_out"]["b"]


def transformer_bench(rounds):
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 128, 256))
    y = jax.random.randint(jax.random.PRNGKey(1), (16,), 0, 10)
    model = nn.Serial(nn.TransformerBlock(4, 1024), nn.GlobalAvgPool(), nn.Dense(10))
    params = model.init(jax.random.PRNGKey(2), x)

    def loss(p, x, y):
        return ce(block_jax(p[0], x).mean(axis=1) @ p[2]["w"] + p[2]["b"], y)

    @jax.jit
    def jax_step(p, x, y):
        value, grads = jax.value_and_grad(loss)(p, x, y)
        return sgd(p, grads), value

    steps = {"jax.value_and_grad": jax_step, "fbp": fbp_step_fn(model)}
    values = [float(s(params, x, y)[1]) for s in steps.values()]
    assert abs(values[0] - values[1]) < 1e-4 * abs(values[0]), values
    times = interleaved({n: (lambda s=s: s(params, x, y)) for n, s in steps.items()}, rounds, 3)
    memory = {n: temp_bytes(s, params, x, y) for n, s in steps.items()}
    report("Transformer block T=128 B=16 d=256 4 heads MLP 1024 -> mean -> Dense 10, one jitted SGD step", times,
           memory, baseline="jax.value_and_grad")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--only", choices=("lstm", "transformer"))
    args = parser.parse_args(argv)
    if args.only in (None, "lstm"):
        lstm_bench(args.rounds)
    if args.only in (None, "transformer"):
        transformer_bench(args.rounds)


if __name__ == "__main__":
    main()
