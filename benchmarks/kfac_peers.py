"""fbp's K-FAC against kfac-jax (the reference JAX implementation), side by side in one process:
steps to a loss target, and time per step.

Settings shared by both optimizers (issue 30's comparison): factored Tikhonov damping 0.1 with
π-adjusted factors (Martens & Grosse §6.3), fixed (no adaptive damping, learning rate or
momentum); the curvature factors updated every step with decay 0.95 and a bias-corrected
average; their inverses refreshed every 10 steps; one Monte-Carlo sample of the Fisher; the
preconditioned gradient stepped with learning rate ``lr`` and momentum 0.9
(``Δ_t = -lr·P g_t + 0.9 Δ_{t-1}``, the same as ``fbp.optim.sgd(lr, momentum=0.9)``); no weight
decay, no norm constraint. The same initial parameters and the same batches (indices drawn by one
NumPy generator per seed) go to both. kfac-jax sees the network as plain ``jax.numpy`` code
(``x @ w + b``, ``lax.conv_general_dilated``), which its graph matcher registers as dense and
convolution layers; the losses are registered with the curvature scale fbp's losses have
(``MSE``'s mean over the output's D entries: weight 1/D).

Networks (digits, 8×8 images, batch 128):
  * ``autoencoder``: 64-128-64-16-64-128-64, tanh, mean squared error, target 0.012;
  * ``mlp``: 64-128-10, tanh, softmax cross-entropy, target 0.005;
  * ``cnn``: conv 3×3×16 (same) - ReLU - conv 3×3×16 (same) - ReLU - flatten - dense 10,
    cross-entropy, target 0.01.

Steps to target: the running mean of the last 10 training losses (each optimizer's own loss
value at its step) below the target, up to ``--steps``, over ``--seeds`` seeds. Time: steps
per call of 20 jitted steps (two inverse periods), in interleaved rounds, medians and the
ratio fbp / kfac-jax over ``--runs`` runs.

kfac-jax is a peer, not a dependency: ``pip install kfac-jax==0.0.8`` in a separate environment
with fbp installed (it brings optax and dm-tree; fbp itself never imports either). Without it
the script says so and exits 0.

Run: ``python benchmarks/kfac_peers.py [--seeds 5] [--steps 1500] [--runs 3] [--only autoencoder,mlp,cnn]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fbp import data, kfac, losses, nn, optim

try:
    import kfac_jax
except ImportError:  # a peer, not a dependency
    kfac_jax = None


def _patch_kfac_jax():
    """kfac-jax 0.0.8 unpacks ``Primitive.get_bind_params`` as ``(subfuns, params)``; JAX 0.10
    returns the params alone (sub-functions inside) and binds them as JAX's own ``eval_jaxpr``
    does. The same evaluation, written the new way."""
    from kfac_jax._src import tag_graph_matcher

    def eval_jaxpr_eqn(eqn, in_values):
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(bind_params, tuple):  # an older JAX: (subfuns, params)
            subfuns, bind_params = bind_params
            in_values = [*subfuns, *in_values]
        with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*in_values, **bind_params)
        return output if isinstance(output, list) else [output]

    tag_graph_matcher.eval_jaxpr_eqn = eval_jaxpr_eqn

DAMPING, DECAY, INVERSE_EVERY, MOMENTUM, BATCH = 0.1, 0.95, 10, 0.9, 128
CURVE_AT = (10, 25, 50, 100, 200, 300)


def _autoencoder():
    layers = []
    for width in (128, 64, 16, 64, 128):
        layers += [nn.Dense(width), nn.Tanh()]
    return nn.Serial(*layers, nn.Dense(64)), losses.MSE(), "images"


def _mlp():
    return nn.Serial(nn.Dense(128), nn.Tanh(), nn.Dense(10)), losses.CategoricalCrossEntropy(from_logits=True), \
        "flat"


def _cnn():
    return nn.Serial(nn.Conv2D(16, 3), nn.ReLU(), nn.Conv2D(16, 3), nn.ReLU(), nn.Flatten(), nn.Dense(10)), \
        losses.CategoricalCrossEntropy(from_logits=True), "nhwc"


WORKLOADS = {"autoencoder": (_autoencoder, 0.05, 0.012), "mlp": (_mlp, 0.05, 0.005), "cnn": (_cnn, 0.02, 0.01)}


def _plain_apply(model):
    """The same network as plain ``jax.numpy`` code on fbp's params (what kfac-jax's graph
    matcher registers)."""
    def apply(params, x):
        for layer, p in zip(model.layers, params, strict=True):
            if isinstance(layer, nn.Dense):
                x = x @ p["w"] + p["b"]
            elif isinstance(layer, nn.Conv2D):
                x = lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
                x = x + p["b"]
            elif isinstance(layer, nn.Tanh):
                x = jnp.tanh(x)
            elif isinstance(layer, nn.ReLU):
                x = jax.nn.relu(x)
            elif isinstance(layer, nn.Flatten):
                x = x.reshape(x.shape[0], -1)
            else:
                raise TypeError(f"no plain version of {layer!r}")
        return x
    return apply


def _data(layout):
    ds = data.load_digits(0.3, seed=0)
    x = jnp.asarray(ds.x_train)
    if layout == "nhwc":
        x = x.reshape(-1, 8, 8, 1)
    return x, jnp.asarray(ds.y_train)


def _kfac_jax_optimizer(model, loss, lr):
    apply = _plain_apply(model)

    def loss_fn(params, batch):
        x, y = batch
        out = apply(params, x)
        if isinstance(loss, losses.MSE):
            kfac_jax.register_squared_error_loss(out, y, weight=1.0 / out.shape[-1])
            return jnp.mean(jnp.square(out - y))
        kfac_jax.register_softmax_cross_entropy_loss(out, y)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], axis=1))

    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0, use_adaptive_learning_rate=False,
        use_adaptive_momentum=False, use_adaptive_damping=False, learning_rate_schedule=lambda _: lr,
        momentum_schedule=lambda _: MOMENTUM, damping_schedule=lambda _: DAMPING, curvature_ema=DECAY,
        num_burnin_steps=0,
        inverse_update_period=INVERSE_EVERY, estimation_mode="fisher_gradients", num_estimator_samples=1,
        multi_device=False, norm_constraint=None, include_norms_in_stats=False)


def _runners(name, lr, seed):
    """``(fbp_step, kfac_jax_step, batches)``: each step takes a batch index array and returns
    the loss value (the state kept inside)."""
    build, _, _ = WORKLOADS[name]
    model, loss, layout = build()
    x, labels = _data(layout)
    y = x.reshape(len(x), -1) if isinstance(loss, losses.MSE) else labels
    params = model.init(jax.random.PRNGKey(seed), x[:1])
    k = kfac.kfac(model, loss, optim.sgd(lr, momentum=MOMENTUM), damping=DAMPING, decay=DECAY,
                  inverse_every=INVERSE_EVERY, mc_samples=1, damping_mode="factored")
    fbp_step = jax.jit(k.step)
    box = {"fbp": (params, k.init(params, x[:BATCH], y[:BATCH])), "count": 0}

    def run_fbp(idx):
        p, s = box["fbp"]
        p, s, value = fbp_step(p, s, x[idx], y[idx], key=jax.random.PRNGKey(1000 * seed + box["count"]))
        box["fbp"], box["count"] = (p, s), box["count"] + 1
        return value

    opt = _kfac_jax_optimizer(model, loss, lr)
    rng = jax.random.PRNGKey(seed)
    kj = {"params": params, "state": opt.init(params, rng, (x[:BATCH], y[:BATCH])), "step": 0, "rng": rng}

    def run_kfac_jax(idx):
        kj["rng"], key = jax.random.split(kj["rng"])
        kj["params"], kj["state"], stats = opt.step(kj["params"], kj["state"], key, batch=(x[idx], y[idx]),
                                                    global_step_int=kj["step"])
        kj["step"] += 1
        return stats["loss"]

    return run_fbp, run_kfac_jax, len(x)


def steps_to_target(name, seed, max_steps):
    _, lr, target = WORKLOADS[name]
    run_fbp, run_kfac_jax, n = _runners(name, lr, seed)
    rng = np.random.default_rng(seed)
    seen = {"fbp": [], "kfac-jax": []}
    found = {"fbp": None, "kfac-jax": None}
    for i in range(max_steps):
        idx = jnp.asarray(rng.choice(n, BATCH, replace=False))
        for label, run in (("fbp", run_fbp), ("kfac-jax", run_kfac_jax)):
            if found[label] is None:
                seen[label].append(float(run(idx)))
                if i >= 9 and np.mean(seen[label][-10:]) < target:
                    found[label] = i + 1
        if all(v is not None for v in found.values()):
            break
    return found, seen


def step_times(name, runs, rounds=5, calls=20):
    _, lr, _ = WORKLOADS[name]
    run_fbp, run_kfac_jax, n = _runners(name, lr, 0)
    idx = [jnp.asarray(np.random.default_rng(i).choice(n, BATCH, replace=False)) for i in range(calls)]
    fns = {"fbp": run_fbp, "kfac-jax": run_kfac_jax}
    for fn in fns.values():  # compile, and a first inverse period
        for i in idx:
            jax.block_until_ready(fn(i))
    ratios = []
    for run in range(runs):
        samples = {label: [] for label in fns}
        for r in range(rounds):
            for label in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                start = time.perf_counter()
                for i in idx:
                    out = fns[label](i)
                jax.block_until_ready(out)
                samples[label].append((time.perf_counter() - start) / calls)
        med = {label: float(np.median(s)) for label, s in samples.items()}
        ratios.append(med["fbp"] / med["kfac-jax"])
        print(f"  run {run + 1}: fbp {med['fbp'] * 1e3:.2f} ms/step, kfac-jax {med['kfac-jax'] * 1e3:.2f} ms/step")
    print(f"  time per step, fbp / kfac-jax: {min(ratios):.2f}–{max(ratios):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="autoencoder,mlp,cnn")
    args = parser.parse_args()
    if kfac_jax is None:
        print("kfac-jax is not installed (pip install kfac-jax==0.0.8 beside fbp): skipped")
        return
    _patch_kfac_jax()
    print(f"[{jax.devices()[0].platform}] kfac-jax {getattr(kfac_jax, '__version__', '?')}")
    for name in args.only.split(","):
        _, lr, target = WORKLOADS[name]
        print(f"\n{name}: steps until the mean loss of the last 10 steps < {target} (lr {lr}, momentum {MOMENTUM})")
        per = {"fbp": [], "kfac-jax": []}
        curves = []
        for seed in range(args.seeds):
            found, seen = steps_to_target(name, seed, args.steps)
            curves.append(seen)
            for label in per:
                per[label].append(found[label])
        print("  the loss curves, mean over seeds of the running mean of 10 steps, at step:")
        for label in per:
            points = [s for s in CURVE_AT if all(len(c[label]) >= s for c in curves)]
            print(f"  {label:9} " + "  ".join(f"{s}: {np.mean([np.mean(c[label][s - 10:s]) for c in curves]):.4f}"
                                          for s in points))
        for label, found in per.items():
            reached = [s for s in found if s is not None]
            print(f"  {label:9} per seed {found}   mean {np.mean(reached) if reached else float('nan'):.1f} "
                  f"({len(reached)}/{len(found)} reached)")
        step_times(name, args.runs)


if __name__ == "__main__":
    main()
