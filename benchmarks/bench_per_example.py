"""Per-example gradient norms and the DP-SGD step: fbp against JAX's vmap(grad) idiom.

Workloads (float32, softmax cross-entropy): the MLP 784-1024-1024-1024-10 (batch 256), the
CNN (28×28×1, two 3×3 convolutions, batch 128), the LSTM (hidden 256, T=64, batch 64) and the
transformer block (d 256, T=128, batch 16) of bench_mlp.py / bench_cnn.py / bench_sequence.py.

Candidates, each one jitted call on the same params and batch:
  * ``step``: fbp's non-private SGD step (``fbp.value_and_grad``);
  * ``clip``: fbp's clipped sum alone, as an SGD step (the DP step without its noise draw);
  * ``dp``: fbp's DP-SGD step — per-example norms and the clipped sum in one backward pass
    (``fbp.privacy.private_grad``: book-keeping), Gaussian noise, SGD;
  * ``vmap-dp``: the JAX idiom — ``vmap(grad)`` per-example gradients of the plain model,
    norms, clipping, sum, noise, SGD;
  * ``norms`` / ``vmap-norms``: the per-example norms alone;
  * ``sgs``: BackPACK's SumGradSquared, ``Σ_b (∇ℓ_b)²`` (``per_example.sum_grad_squared``).

When torch, Opacus and BackPACK are installed (``pip install torch opacus backpack-for-pytorch``),
their CPU steps join the MLP and CNN rounds from the same weights (``dp_peers.py``): Opacus
with hooks and with ghost clipping (each a DP-SGD step), and BackPACK's ``BatchL2Grad`` norms.

Run: ``python benchmarks/bench_per_example.py [--runs K] [--only mlp,cnn,lstm,transformer]``:
medians per run, ratio ranges over runs, XLA's temp memory, and fbp's per-layer choice
(``per_example.routes``).
"""

import argparse
import importlib.util

import jax
import jax.numpy as jnp
from common import (
    cnn_workload,
    lstm_workload,
    mlp_workload,
    random_batch,
    ratio_runs,
    sgd,
    temp_bytes,
    transformer_workload,
)

import fbp
from fbp import losses, per_example, privacy

CCE = losses.CategoricalCrossEntropy(from_logits=True)
CLIP, SIGMA = 1.0, 1.0


def candidates(model, batch):
    vg = fbp.value_and_grad(model, CCE)
    dp = privacy.private_grad(model, CCE, CLIP, SIGMA, batch)
    clip = privacy.clipped_grad(model, CCE, CLIP)
    norms = per_example.grad_norms(model, CCE)
    sgs = per_example.sum_grad_squared(model, CCE)

    def per_example_grads(params, x, y):
        return jax.vmap(lambda xb, yb: jax.grad(lambda p: CCE(model.apply(p, xb[None]), yb[None]))(params))(x, y)

    def vmap_norms(params, x, y):
        g = per_example_grads(params, x, y)
        return jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1) for a in jax.tree_util.tree_leaves(g)))

    def vmap_dp(params, x, y, key):
        g = per_example_grads(params, x, y)
        n = jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1) for a in jax.tree_util.tree_leaves(g)))
        c = jnp.minimum(1.0, CLIP / n)
        leaves, treedef = jax.tree_util.tree_flatten(g)
        keys = jax.random.split(key, len(leaves))
        noisy = [(jnp.tensordot(c, a, 1) + SIGMA * CLIP * jax.random.normal(k, a.shape[1:])) / batch
                 for a, k in zip(leaves, keys)]
        return sgd(params, jax.tree_util.tree_unflatten(treedef, noisy))

    return {
        "step": jax.jit(lambda p, x, y, k: sgd(p, vg(p, x, y)[1])),
        "clip": jax.jit(lambda p, x, y, k: sgd(p, jax.tree_util.tree_map(lambda g: g / batch, clip(p, x, y)[1]))),
        "dp": jax.jit(lambda p, x, y, k: sgd(p, dp(p, x, y, noise_key=k)[1])),
        "vmap-dp": jax.jit(vmap_dp),
        "norms": jax.jit(lambda p, x, y, k: norms(p, x, y)[1]),
        "vmap-norms": jax.jit(lambda p, x, y, k: vmap_norms(p, x, y)),
        "sgs": jax.jit(lambda p, x, y, k: sgs(p, x, y)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="mlp,cnn,lstm,transformer")
    args = parser.parse_args(argv)
    workloads = {"mlp": mlp_workload, "cnn": cnn_workload, "lstm": lstm_workload, "transformer": transformer_workload}
    for name in args.only.split(","):
        model, shape = workloads[name]()
        params, x, y = random_batch(model, shape)
        fns = candidates(model, shape[0])
        inputs = (params, x, y, jax.random.PRNGKey(3))
        calls = {k: (lambda f=f, a=inputs: f(*a)) for k, f in fns.items()}
        memory = {k: temp_bytes(f, *inputs) for k, f in fns.items()}
        ratios = {"clip / step": [], "dp / step": [], "vmap-dp / dp": [], "vmap-norms / norms": [], "sgs / step": []}
        if name in ("mlp", "cnn") and all(importlib.util.find_spec(m) for m in ("torch", "opacus", "backpack")):
            import dp_peers

            peers = dp_peers.candidates(getattr(dp_peers, name), params, x, y, CLIP, SIGMA)
            calls.update(peers)
            ratios.update({"opacus-hooks / dp": [], "opacus-ghost / dp": [], "backpack-norms / norms": []})
            got = peers["backpack-norms"]().detach().numpy()
            ref = jax.device_get(fns["norms"](*inputs))
            print(f"  BackPACK's norms vs fbp's: max relative difference {abs(got / ref - 1).max():.1e}")
        if importlib.util.find_spec("jax_privacy"):
            import jax_privacy_peer

            jp_step = jax_privacy_peer.dp_step(model, CCE, CLIP, SIGMA, shape[0])
            calls["jax-privacy-dp"] = lambda a=inputs, f=jp_step: f(*a)
            memory["jax-privacy-dp"] = temp_bytes(jp_step, *inputs)
            theirs = jax.jit(jax_privacy_peer.clipped_sum(model, CCE, CLIP))(params, x, y)
            ours = jax.jit(privacy.clipped_grad(model, CCE, CLIP))(params, x, y)[1]
            gap = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(
                jax.tree_util.tree_leaves(theirs), jax.tree_util.tree_leaves(ours), strict=True))
            print(f"  jax-privacy's clipped sum vs fbp's: max |difference| / max |entry| {gap:.1e}")
            ratios["jax-privacy-dp / dp"] = []
        print(f"\n{name.upper()}, batch {shape[0]}  [{jax.devices()[0].platform}]")
        print("  fbp's route per layer: " + ", ".join(f"{p}: {r}" for p, r in
                                                     per_example.routes(model, CCE, params, x, y).items()))
        print("  XLA temp memory (MiB): " + "  ".join(f"{k} {m / 2**20:.1f}" for k, m in memory.items() if m))
        ratios = ratio_runs(calls, list(ratios), args.runs, args.rounds, args.reps)
        for key, values in ratios.items():
            print(f"  ratio {key}: {min(values):.2f} – {max(values):.2f}")
        if memory.get("dp") and memory.get("step"):
            print(f"  temp memory clip / step: {memory['clip'] / memory['step']:.2f}   dp / step: "
                  f"{memory['dp'] / memory['step']:.2f}")


if __name__ == "__main__":
    main()
