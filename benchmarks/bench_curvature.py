"""The cost of curvature from one backward pass, relative to a plain training step, and against
the same quantities by JAX autodiff.

Workloads (float32, softmax cross-entropy over 10 classes): the MLP 784-1024-1024-1024-10
(batch 256) and the CNN (28×28×1, two 3×3 convolutions, batch 128) of bench_mlp.py / bench_cnn.py.

Candidates, each one jitted call on the same params and batch:
  * ``step``: fbp's SGD step (``fbp.value_and_grad``);
  * ``ggn-mc``: ``fbp.curvature.diag_ggn_mc`` with one sample (BackPACK's DiagGGNMC);
  * ``ggn``: ``fbp.curvature.diag_ggn``, exact (10 factor columns; BackPACK's DiagGGNExact);
  * ``kfac-factors``: ``fbp.curvature.kfac_factors`` (one sample) with the loss and gradient
    over the same forward (``with_grads=True``) — what a K-FAC step computes before preconditioning;
  * ``kfac-step``: ``fbp.kfac`` — the factors, their moving averages, the preconditioning and
    the SGD update (eigendecompositions every 10 steps, here timed on a step that skips them);
    ``kfac-step-factored`` the same with Martens & Grosse's factored damping (two products per
    block instead of four);
  * ``jax-ggn-mc`` / ``jax-ggn``: the JAX idiom — per-example ``vjp`` of the plain model with
    the same sampled (or exact) factor columns, ``vmap`` over examples (``lax.map`` over the
    columns), squared and summed.

When torch and BackPACK are installed (``pip install torch backpack-for-pytorch``), their CPU
``DiagGGNMC``, ``DiagGGNExact`` and ``KFAC`` (``curvature_peers.py``) join the rounds from the
same weights, with a plain torch step for their own ratios (BackPACK's exact diagonal is
compared with fbp's first). ``jax-ggn`` (tens of seconds a call on 2 CPU cores) is timed apart,
on three calls after the rounds.

Run: ``python benchmarks/bench_curvature.py [--runs K] [--only mlp,cnn]``: medians per run,
ratio ranges over runs and XLA's temp memory.
"""

import argparse
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
from common import block, cnn_workload, mlp_workload, random_batch, ratio_runs, sgd, temp_bytes

import fbp
from fbp import curvature, kfac, losses, optim

CCE = losses.CategoricalCrossEntropy(from_logits=True)


def jax_diag(model, params, x, columns):
    """``Σ_b Σ_m (J_bᵀ s_bm)²`` by per-example ``vjp`` of the plain model; ``columns: (B, C, M)``."""

    def one_column(s):  # s: (B, C)
        def per_example(xb, sb):
            _, pull = jax.vjp(lambda p: model.apply(p, xb[None])[0], params)
            return jax.tree_util.tree_map(jnp.square, pull(sb)[0])

        return jax.tree_util.tree_map(lambda a: a.sum(0), jax.vmap(per_example)(x, s))

    per_column = jax.lax.map(one_column, jnp.moveaxis(columns, -1, 0))
    return jax.tree_util.tree_map(lambda a: a.sum(0), per_column)


def candidates(model, params, x, y):
    """Each candidate is ``(jitted f, extra args)``, called as ``f(params, x, y, key, *extra)``:
    the batch is an argument, never a constant (XLA would fold ``xᵀx`` into the program)."""
    vg = fbp.value_and_grad(model, CCE)
    mc = curvature.diag_ggn_mc(model, CCE, 1)
    exact = curvature.diag_ggn(model, CCE)
    factors = curvature.kfac_factors(model, CCE, mc_samples=1, with_grads=True)
    k = kfac.kfac(model, CCE, optim.sgd(0.01, momentum=0.9), inverse_every=10)
    k_factored = kfac.kfac(model, CCE, optim.sgd(0.01, momentum=0.9), inverse_every=10, damping_mode="factored")
    observe = lambda kk: jax.jit(lambda p, a, b: kk.observe(kk.init(p, a, b),  # noqa: E731
                                                            factors(p, a, b, key=jax.random.key(0))[2]))
    state = observe(k)(params, x, y)
    state = state._replace(count=state.count + 1)  # the timed step does not refresh the inverses
    state_f = observe(k_factored)(params, x, y)
    state_f = state_f._replace(count=state_f.count + 1)

    def jax_mc(p, x, y, key):
        pred = model.apply(p, x)
        return jax_diag(model, p, x, CCE.sampled_hessian_factor(pred, y, key, 1))

    def jax_exact(p, x, y, key):
        pred = model.apply(p, x)
        return jax_diag(model, p, x, CCE.hessian_factor(pred, y))

    return {
        "step": (jax.jit(lambda p, x, y, key: sgd(p, vg(p, x, y)[1])), ()),
        "ggn-mc": (jax.jit(lambda p, x, y, key: mc(p, x, y, key=key)), ()),
        "ggn": (jax.jit(lambda p, x, y, key: exact(p, x, y)), ()),
        "kfac-factors": (jax.jit(lambda p, x, y, key: factors(p, x, y, key=key)), ()),
        "kfac-step": (jax.jit(lambda p, x, y, key, s: k.step(p, s, x, y, key=key)[:2]), (state,)),
        "kfac-step-factored": (jax.jit(lambda p, x, y, key, s: k_factored.step(p, s, x, y, key=key)[:2]), (state_f,)),
        "jax-ggn-mc": (jax.jit(jax_mc), ()),
        "jax-ggn": (jax.jit(jax_exact), ()),
    }


def check_agreement(fns, inputs):
    """fbp's diagonals equal the autodiff idiom's (same columns) before anything is timed."""
    for ours, theirs in (("ggn-mc", "jax-ggn-mc"), ("ggn", "jax-ggn")):
        a, b = fns[ours][0](*inputs), fns[theirs][0](*inputs)
        rel = max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
                  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))
        print(f"  {ours} vs {theirs}: max relative difference {rel:.1e}")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="mlp,cnn")
    parser.add_argument("--skip-jax", action="store_true", help="leave out the autodiff candidates (slow)")
    args = parser.parse_args(argv)
    workloads = {"mlp": mlp_workload, "cnn": cnn_workload}
    for name in args.only.split(","):
        model, shape = workloads[name]()
        params, x, y = random_batch(model, shape)
        key = jax.random.key(3)
        inputs = (params, x, y, key)
        fns = candidates(model, params, x, y)
        slow = fns.pop("jax-ggn")
        if args.skip_jax:
            fns.pop("jax-ggn-mc")
        print(f"\n{name.upper()}, batch {shape[0]}  [{jax.devices()[0].platform}]")
        if not args.skip_jax:
            check_agreement({**fns, "jax-ggn": slow}, inputs)
        calls = {k: (lambda f=f, extra=extra, a=inputs: f(*a, *extra)) for k, (f, extra) in fns.items()}
        memory = {k: temp_bytes(f, *inputs, *extra) for k, (f, extra) in fns.items()}
        print("  XLA temp memory (MiB): " + "  ".join(f"{k} {m / 2**20:.1f}" for k, m in memory.items() if m))
        ratios = ["ggn-mc / step", "ggn / step", "kfac-factors / step", "kfac-step / step",
                  "kfac-step-factored / step"]
        ratios += [] if args.skip_jax else ["jax-ggn-mc / ggn-mc"]
        if importlib.util.find_spec("torch") and importlib.util.find_spec("backpack"):
            import curvature_peers

            peers = curvature_peers.candidates(name, params, x, y)
            worst = curvature_peers.agreement(name, params, x, y, jax.tree_util.tree_leaves(fns["ggn"][0](*inputs)))
            print(f"  BackPACK's exact GGN diagonal vs fbp's: max relative difference {worst:.1e}")
            calls.update(peers)
            ratios += ["backpack-ggn-mc / torch-step", "backpack-ggn / torch-step", "backpack-kfac / torch-step",
                       "backpack-ggn-mc / ggn-mc", "backpack-ggn / ggn", "backpack-kfac / kfac-factors",
                       "torch-step / step"]
        for key_, values in ratio_runs(calls, ratios, args.runs, args.rounds, args.reps).items():
            print(f"  ratio {key_}: {min(values):.2f} – {max(values):.2f}")
        if not args.skip_jax:
            exact = statistics.median(_seconds(fns["ggn"][0], *inputs) for _ in range(3))
            theirs = statistics.median(_seconds(slow[0], *inputs) for _ in range(3))
            print(f"  ratio jax-ggn / ggn: {theirs / exact:.1f} (three calls each, after the rounds)")


def _seconds(fn, *args):
    start = time.perf_counter()
    block(fn(*args))
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
