"""Training diagnostics inside the jitted step against a plain step, and against Cockpit.

Each candidate runs 16 training steps (SGD) in one jitted ``lax.scan`` over 16 batches:

  * ``plain``: fit's step without diagnostics (``fbp.step_pass.optimizer_update``);
  * ``economy``, ``business``: with that preset computed on every step
    (``fbp.diagnostics.training.watched_update``);
  * ``full/16``: the full preset on one step in 16 (and α's end point on the step after),
    the plain pass on the others — as ``fit(diagnostics="full", diagnostics_every=16)``;

Networks: 3C3D, Cockpit's own benchmark network (DeepOBS ``cifar10_3c3d``: three convolutions
5×5/3×3/3×3 with 64/96/128 channels, max-pools, dense 512-256-10; 895k parameters) on random
32×32×3 images, batch 128; and the digits-sized MLP 64-128-128-10, batch 128. With
``cockpit-for-pytorch`` installed (``pip install cockpit-for-pytorch``; uninstall the CUDA-only
torchvision wheel), Cockpit itself times the same 3C3D and batch in PyTorch on this CPU (its
plain step, and each configuration on every step), interleaved the same way.

With ``--each``, one quantity at a time on every step instead of the presets (what each costs).

Run: ``python benchmarks/bench_diagnostics.py [--runs 3] [--only 3c3d,mlp] [--no-peer] [--each]``; ratios
per run and their range (Cockpit's presets take 2–4 s a step here: with it, one round is
several minutes).
"""

import argparse

import jax
import jax.numpy as jnp
from common import ratio_runs

from fbp import losses, nn, optim
from fbp.diagnostics import DiagnosticsState, watch
from fbp.diagnostics.training import watched_update
from fbp.optim import apply_updates
from fbp.step_pass import optimizer_update

LOSS = losses.CategoricalCrossEntropy(from_logits=True)
STEPS = 16


def c3d3():
    """DeepOBS's cifar10_3c3d (Cockpit's benchmark network), NHWC."""
    return nn.Serial(nn.Conv2D(64, 5, padding="VALID"), nn.ReLU(), nn.MaxPool2D(3, 2, "SAME"),
                     nn.Conv2D(96, 3, padding="VALID"), nn.ReLU(), nn.MaxPool2D(3, 2, "SAME"),
                     nn.Conv2D(128, 3), nn.ReLU(), nn.MaxPool2D(3, 2, "SAME"), nn.Flatten(),
                     nn.Dense(512), nn.ReLU(), nn.Dense(256), nn.ReLU(), nn.Dense(10)), (128, 32, 32, 3)


def mlp():
    return nn.Serial(nn.Dense(128), nn.ReLU(), nn.Dense(128), nn.ReLU(), nn.Dense(10)), (128, 64)


def _scan(update):
    """16 steps in one jitted scan; every step's diagnostics are outputs (as fit's buffer), so XLA
    cannot drop them."""
    @jax.jit
    def run(params, opt_state, xs, ys):
        def body(carry, batch):
            p, o = carry
            value, updates, o, _, _, q = update(p, o, *batch)
            return (apply_updates(p, updates), o), (value, q)

        return jax.lax.scan(body, (params, opt_state), (xs, ys))

    return run


EACH = {"norms": ["noise_scale"], "tests": ["inner_test", "ortho_test"], "alpha": ["alpha"],
        "histogram": ["grad_hist_1d"], "sgs": ["gradient_snr"], "mc column": ["tic_diag"],
        "eigenvalue": ["ggn_max_eigenvalue"]}


def calls(model, shape, each=False):
    xs = jax.random.normal(jax.random.PRNGKey(0), (STEPS, *shape))
    ys = jax.random.randint(jax.random.PRNGKey(1), (STEPS, shape[0]), 0, 10)
    params = model.init(jax.random.PRNGKey(2), xs[0])
    opt = optim.sgd(0.01)
    plain = _scan(optimizer_update(model, LOSS, opt))
    out = {"plain": lambda: plain(params, opt.init(params), xs, ys)}
    settings = [(name, names, 1) for name, names in EACH.items()] if each else \
        [("economy", "economy", 1), ("business", "business", 1), ("full/16", "full", 16)]
    for name, preset, every in settings:
        update = watched_update(model, LOSS, opt, watch(preset, every))
        keyed = lambda p, o, x, y, u=update: u(p, o, x, y, key=jax.random.PRNGKey(3))  # noqa: E731
        run = _scan(keyed)
        state = DiagnosticsState.begin(opt.init(params), params)
        out[name] = lambda run=run, state=state: run(params, state, xs, ys)
    return out, params, xs, ys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="3c3d,mlp")
    parser.add_argument("--no-peer", action="store_true", help="time fbp alone (Cockpit takes minutes per round)")
    parser.add_argument("--each", action="store_true", help="one quantity at a time (every step), fbp alone")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; {STEPS} SGD steps per call")
    for name in args.only.split(","):
        model, shape = {"3c3d": c3d3, "mlp": mlp}[name]()
        print(f"\n{name} {shape}")
        candidates, params, xs, ys = calls(model, shape, args.each)
        wanted = [f"{k} / plain" for k in candidates if k != "plain"]
        if name == "3c3d" and not (args.no_peer or args.each):
            try:
                from diagnostics_peers import cockpit_calls
            except ImportError as missing:
                print(f"  Cockpit not timed ({missing.name} is not installed)")
            else:
                peer = cockpit_calls(params, xs, ys)
                candidates |= peer
                wanted += [f"{k} / cockpit plain" for k in peer if k != "cockpit plain"]
        ratios = ratio_runs(candidates, wanted, args.runs, args.rounds, reps=1)
        for key, values in ratios.items():
            print(f"  {key}: {min(values):.2f}–{max(values):.2f}")
    return jnp.zeros(())


if __name__ == "__main__":
    main()
