"""Sequence models, one jitted SGD step each: fbp vs JAX's autodiff of pure-jnp equivalents.

* LSTM: T=64, B=64, input 32, hidden 256, last step -> Dense 10, cross-entropy. Two JAX peers:
  the input projection inside the scan (the textbook cell — the fastest pure-JAX form found
  here, so the baseline) and hoisted out of it as one matmul for all steps.
* Transformer block: T=128, B=16, d=256, 4 heads, MLP 1024 (pre-LN, GELU), mean over time ->
  Dense 10, cross-entropy.

When PyTorch is installed, its eager step joins the same interleaved rounds (``torch_peers.py``),
from the same weights. Every candidate is also timed as a forward pass alone, which splits its
step into forward and backward + update ("where the time goes").

Run: ``python benchmarks/bench_sequence.py [--only lstm|transformer]``.
"""

import argparse
import importlib.util

import jax
import jax.numpy as jnp
from common import interleaved, lstm_workload, report, temp_bytes, transformer_workload

import fbp
from fbp import losses

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


def jax_step_fn(loss):
    @jax.jit
    def step(p, x, y):
        value, grads = jax.value_and_grad(loss)(p, x, y)
        return sgd(p, grads), value

    return step


def compare(title, params, x, y, candidates, baseline, torch_peer, rounds):
    """``candidates``: name -> (jitted step, jitted loss). Times steps and forwards interleaved,
    checks all report the same loss, prints ratios and the forward / backward split."""
    calls = {n: (lambda s=s: s(params, x, y)) for n, (s, _) in candidates.items()}
    calls.update({f"{n} forward": (lambda f=f: f(params, x, y)) for n, (_, f) in candidates.items()})
    if torch_peer is not None:
        step, forward = torch_peer
        calls["torch eager"], calls["torch eager forward"] = step, forward
    values = [float(c()[1]) for n, c in calls.items() if n in candidates]
    if torch_peer is not None:
        values.append(float(calls["torch eager forward"]()))
    assert max(values) - min(values) < 1e-4 * abs(values[0]), values
    times = interleaved(calls, rounds, 3)
    steps = {n: t for n, t in times.items() if not n.endswith(" forward")}
    memory = {n: temp_bytes(s, params, x, y) for n, (s, _) in candidates.items()}
    report(title, steps, memory, baseline=baseline)
    print("  where the time goes (ms): forward (inference: saves no residuals) | backward + update | step")
    for name, t in steps.items():
        fwd = times[f"{name} forward"]
        print(f"    {name:<28} {fwd * 1e3:8.2f} | {(t - fwd) * 1e3:8.2f} | {t * 1e3:8.2f}")


def torch_available():
    return importlib.util.find_spec("torch") is not None


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
    model, shape = lstm_workload()
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jax.random.randint(jax.random.PRNGKey(1), shape[:1], 0, 10)
    params = model.init(jax.random.PRNGKey(2), x)

    def jax_loss(hoisted):
        return lambda p, x, y: ce(lstm_jax(p[0], x, hoisted) @ p[2]["w"] + p[2]["b"], y)

    candidates = {"jax (projection in scan)": (jax_step_fn(jax_loss(False)), jax.jit(jax_loss(False))),
                  "jax (projection hoisted)": (jax_step_fn(jax_loss(True)), jax.jit(jax_loss(True))),
                  "fbp": (fbp_step_fn(model), jax.jit(lambda p, x, y: LOSS(model.apply(p, x), y)))}
    peer = None
    if torch_available():
        import torch_peers
        peer = torch_peers.lstm(params, x, y, LR)
    compare("LSTM T=64 B=64 in=32 hidden=256 -> Dense 10, one SGD step", params, x, y, candidates,
            "jax (projection in scan)", peer, rounds)


# --------------------------------------------------------------------------- transformer
def layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["b"]


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
    model, shape = transformer_workload()
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jax.random.randint(jax.random.PRNGKey(1), shape[:1], 0, 10)
    params = model.init(jax.random.PRNGKey(2), x)

    def loss(p, x, y):
        return ce(block_jax(p[0], x).mean(axis=1) @ p[2]["w"] + p[2]["b"], y)

    candidates = {"jax.value_and_grad": (jax_step_fn(loss), jax.jit(loss)),
                  "fbp": (fbp_step_fn(model), jax.jit(lambda p, x, y: LOSS(model.apply(p, x), y)))}
    peer = None
    if torch_available():
        import torch_peers
        peer = torch_peers.transformer(params, x, y, LR, heads=4)
    compare("Transformer block T=128 B=16 d=256 4 heads MLP 1024 -> mean -> Dense 10, one SGD step", params, x, y,
            candidates, "jax.value_and_grad", peer, rounds)


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
