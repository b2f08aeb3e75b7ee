"""One short script that proves fbp on an accelerator (run it where a GPU is lent).

Sections, each independent (a failure is recorded and the next one runs):

  * ``check``: ``python -m fbp check --jit`` in float64, and in float32 at the highest matmul
    precision (GPUs default to TF32 for float32 products), in subprocesses;
  * ``engine``: ``fbp.value_and_grad(..., extensions=[GradNorms, Variance, ClippedGrad, DiagGGN])``
    on a small MLP against ``vmap(jax.grad)`` and a dense ``Jᵀ H J`` (float64, jitted);
  * ``fit``: the digits MLP trained with ``fit`` (jitted epochs), float32 and ``precision="bfloat16"``;
    DP-SGD (``private_grad``) one jitted step;
  * ``sharded``: ``make_step(mesh=data_mesh())`` against the unsharded step, three steps;
  * ``speed``: fbp's jitted step against ``jax.grad``'s on bench_mlp's MLP and bench_cnn's CNN
    (interleaved rounds, medians, one process), float32 and bfloat16;
  * ``diagnostics``: ``fbp.diagnostics`` against ``vmap(jax.grad)`` and the dense GGN (float64),
    ``fit(diagnostics="full")``, and bench_diagnostics' 3C3D presets against a plain step;
  * ``steps``: the private step (clipping and the noise draw included) and the K-FAC step
    against the plain step, on bench_mlp's MLP and bench_cnn's CNN (issue 30's ratios);
  * ``peers``: which peers are installed (torch, Opacus, BackPACK, kfac-jax, jax-privacy), and
    for each installed set its side-by-side benchmark's ratio lines (one run).

Run: ``python benchmarks/gpu_check.py [--out results.json] [--only s1,s2] [--dry-run]``, or
``bash benchmarks/gpu_check.sh`` (all of it, one JSON report). ``--dry-run`` runs every section
at the smallest sizes (one round, two epochs, one dtype for the checks) so the script is proved
end to end on a CPU before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the check subprocesses share the device
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 where asked; everything else is cast to float32

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import cnn_workload, interleaved, mlp_workload  # noqa: E402

import fbp  # noqa: E402
from fbp import curvature, data, losses, nn, optim, parallel, per_example, privacy, train  # noqa: E402

CCE = losses.CategoricalCrossEntropy(from_logits=True)
F32 = jnp.float32
DRY = {"on": False}  # --dry-run: the smallest sizes (set by main)


def _rounds(n: int) -> int:
    return 1 if DRY["on"] else n


def section_check(results):
    for dtype, env in (("float64", {}), ("float32", {"JAX_DEFAULT_MATMUL_PRECISION": "highest"}))[
            :1 if DRY["on"] else 2]:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "fbp", "check", "--dtype", dtype, "--jit"], capture_output=True,
                             text=True, timeout=600, env=os.environ | env, cwd=os.path.dirname(HERE))
        tail = out.stdout.strip().splitlines()[-3:] + out.stderr.strip().splitlines()[-2:]
        results[f"check {dtype} --jit"] = {"rc": out.returncode, "seconds": round(time.perf_counter() - start, 1),
                                           "tail": tail}


def section_engine(results):
    model = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(8), nn.ReLU(), nn.Dense(5))
    x = jax.random.normal(jax.random.key(0), (12, 7), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (12,), 0, 5)
    params = model.init(jax.random.key(2), x)
    exts = [per_example.GradNorms(), per_example.Variance(), privacy.ClippedGrad(0.5), curvature.DiagGGN()]
    value, grads, q = jax.jit(fbp.value_and_grad(model, CCE, extensions=exts))(params, x, y)
    summed = losses.CategoricalCrossEntropy(from_logits=True, reduction="sum")
    one = lambda p, xb, yb: summed(model.apply(p, xb[None]), yb[None])  # noqa: E731
    per = jax.vmap(jax.grad(one), (None, 0, 0))(params, x, y)
    ref_norms = jnp.sqrt(sum(jnp.sum(jnp.square(a.reshape(12, -1)), 1) for a in jax.tree_util.tree_leaves(per)))
    got_norms = jnp.sqrt(sum(jnp.square(v) for v in q["grad_norms"].values()))
    ref_grads = jax.grad(lambda p: CCE(model.apply(p, x), y))(params)
    err = {"grads": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(grads),
                                                                        jax.tree_util.tree_leaves(ref_grads),
                                                                        strict=True)),
           "grad_norms": float(jnp.max(jnp.abs(got_norms - ref_norms)))}
    c = jnp.minimum(1.0, 0.5 / ref_norms)
    ref_clip = jax.tree_util.tree_map(lambda g: jnp.tensordot(c, g, 1), per)
    got_clip = {k: v for k, v in q["clipped_grad"].items()}
    err["clipped_grad"] = max(float(jnp.max(jnp.abs(got_clip[path][name] - ref_clip[int(path)][name])))
                              for path in got_clip for name in got_clip[path])
    err["variance"] = max(float(jnp.max(jnp.abs(q["variance"][path][name] - jnp.var(per[int(path)][name], 0))))
                          for path in q["variance"] for name in q["variance"][path])
    results["engine float64 jit: max abs error vs vmap(jax.grad)"] = err
    results["engine dtype"] = str(value.dtype)


def section_fit(results):
    ds = data.load_digits()
    model = nn.Serial(nn.Dense(128), nn.ReLU(), nn.Dense(10))
    x, y = ds.x_train.astype(np.float32), ds.y_train
    for label, kw in (("float32", {}), ("bfloat16", {"precision": "bfloat16"})):
        params = model.init(jax.random.key(0), x[:1])
        start = time.perf_counter()
        result = train.fit(model, CCE, optim.adam(1e-3), params, x, y, key=jax.random.key(1), epochs=_rounds(20),
                           batch_size=64, progress=False, **kw)
        acc = train.evaluate(model, CCE, result.params, ds.x_test.astype(np.float32), ds.y_test)["accuracy"]
        results[f"fit digits MLP {label}"] = {"test_accuracy": round(acc, 4), "seconds": round(
            time.perf_counter() - start, 2), "stop": result.stop_reason}
    params = model.init(jax.random.key(0), x[:1])
    f = jax.jit(privacy.private_grad(model, CCE, 1.0, 1.1, 64.0))
    values, grads, norms = f(params, jnp.asarray(x[:64]), jnp.asarray(y[:64]), noise_key=jax.random.key(3))
    results["private_grad step"] = {"finite": bool(all(jnp.all(jnp.isfinite(g)) for g in
                                                       jax.tree_util.tree_leaves(grads))),
                                    "median norm": float(jnp.median(norms))}


def section_sharded(results):
    model, shape = mlp_workload()
    x = jax.random.normal(jax.random.key(0), shape, F32)
    y = jax.random.randint(jax.random.key(1), (shape[0],), 0, 10)
    opt = optim.sgd(0.01, momentum=0.9)
    mesh = parallel.data_mesh()
    outs = []
    for step in (train.make_step(model, CCE, opt), train.make_step(model, CCE, opt, mesh=mesh)):
        params = model.init(jax.random.key(2), x)
        state = opt.init(params)
        for _ in range(3):
            params, state, value = step(params, state, x, y)
        outs.append((params, float(value)))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(outs[0][0]),
                                                              jax.tree_util.tree_leaves(outs[1][0]), strict=True))
    results["sharded step vs one device (3 steps)"] = {"devices": len(mesh.devices.flat), "max_param_diff": diff,
                                                       "losses": [outs[0][1], outs[1][1]]}


def _speed_one(model, shape, dtype):
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    y = jax.random.randint(jax.random.key(1), (shape[0],), 0, 10)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), model.init(jax.random.key(2), x))
    ours = jax.jit(fbp.value_and_grad(model, CCE))
    theirs = jax.jit(jax.value_and_grad(lambda p, a, b: CCE(model.apply(p, a), b)))
    engine = jax.jit(fbp.value_and_grad(model, CCE, extensions=[per_example.GradNorms(), per_example.Variance(),
                                                                privacy.ClippedGrad(1.0)]))
    t = interleaved({"fbp": lambda: ours(params, x, y), "jax.grad": lambda: theirs(params, x, y),
                     "engine3": lambda: engine(params, x, y)}, rounds=_rounds(9), reps=_rounds(20))
    return {"fbp ms": round(t["fbp"] * 1e3, 3), "jax.grad ms": round(t["jax.grad"] * 1e3, 3),
            "fbp / jax.grad": round(t["fbp"] / t["jax.grad"], 3),
            "norms+variance+clip / plain": round(t["engine3"] / t["fbp"], 3)}


def section_speed(results):
    for name, (model, shape) in (("mlp", mlp_workload()), ("cnn", cnn_workload())):
        for dtype in (jnp.float32, jnp.bfloat16):
            results[f"speed {name} {jnp.dtype(dtype).name}"] = _speed_one(model, shape, dtype)


def section_diagnostics(results):
    """fbp.diagnostics on the device: the tests and curvature against vmap(grad) and the dense GGN
    (float64), a diagnosed fit, and bench_diagnostics' 3C3D presets against a plain step."""
    from bench_diagnostics import c3d3, calls

    from fbp import diagnostics

    model = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(4))
    x = jax.random.normal(jax.random.key(0), (12, 5), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (12,), 0, 4)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(2), x))
    exts = [diagnostics.NoiseScale(), diagnostics.InnerTest(), diagnostics.GGNTrace(),
            diagnostics.GGNMaxEigenvalue(iterations=80, key=jax.random.key(3))]
    q = jax.jit(fbp.value_and_grad(model, CCE, extensions=exts))(params, x, y)[-1]
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(t)])  # noqa: E731
    per = jax.vmap(lambda a, b: flat(jax.grad(lambda p: CCE(model.apply(p, a[None]), b[None]))(params)))(x, y)
    b, mean = per.shape[0], per.mean(0)
    s, g2 = jnp.sum(per ** 2), mean @ mean
    pred, pull = jax.vjp(lambda p: model.apply(p, x), params)
    rows = jax.vmap(lambda c: flat(pull(c)[0]))(jnp.eye(pred.size, dtype=pred.dtype).reshape(pred.size, *pred.shape))
    ggn = rows.T @ jax.hessian(lambda z: CCE(z, y))(pred).reshape(pred.size, pred.size) @ rows
    proj = per @ mean
    want = {"b_simple": float((s - b * g2) / (b * g2 - s / b)),
            "inner_test": float(jnp.sqrt(((proj ** 2).sum() - b * g2 ** 2) / (b - 1) / (b * g2 ** 2))),
            "ggn_trace": float(jnp.trace(ggn)), "ggn_max_eigenvalue": float(jnp.linalg.eigvalsh(ggn)[-1])}
    got = {"b_simple": float(q["noise_scale"]["b_simple"]), "inner_test": float(q["inner_test"]),
           "ggn_trace": float(q["ggn_trace"]["total"]), "ggn_max_eigenvalue": float(q["ggn_max_eigenvalue"])}
    results["diagnostics vs autodiff (float64, max relative error)"] = max(abs(got[k] - want[k]) / abs(want[k])
                                                                         for k in want)
    ds = data.load_digits()
    mlp = nn.Serial(nn.Dense(64), nn.Tanh(), nn.Dense(10))
    xd = ds.x_train.astype(np.float32)
    start = time.perf_counter()
    r = train.fit(mlp, CCE, optim.sgd(0.3), mlp.init(jax.random.key(0), xd[:1]), xd, ds.y_train, key=jax.random.key(1),
                  epochs=_rounds(5), batch_size=128, progress=False, scan_epochs=True, diagnostics="full")
    leaves = [v for e in r.diagnostics.values() for v in jax.tree_util.tree_leaves(e)]
    results[f"fit(diagnostics='full') digits MLP {_rounds(5)} epochs"] = {
        "steps": len(r.diagnostics), "seconds": round(time.perf_counter() - start, 2),
        "all finite (alpha of the last step excepted)": bool(sum(not np.all(np.isfinite(v)) for v in leaves) <= 1),
        "findings": [f.name for f in diagnostics.findings(r.diagnostics)]}
    cands, *_ = calls(*c3d3())
    t = interleaved({k: cands[k] for k in ("plain", "economy", "business", "full/16")}, rounds=_rounds(5),
                    reps=_rounds(2))
    results["3C3D 16 SGD steps, preset / plain"] = {k: round(v / t["plain"], 3) for k, v in t.items() if k != "plain"}
    results["3C3D plain ms per step"] = round(t["plain"] / 16 * 1e3, 3)


def section_steps(results):
    """The private and K-FAC steps against the plain one (float32, one process, interleaved)."""
    from bench_curvature import candidates as curvature_steps
    from bench_per_example import candidates as private_steps

    def one(model, shape):
        x = jax.random.normal(jax.random.key(0), shape, F32)
        y = jax.random.randint(jax.random.key(1), (shape[0],), 0, 10)
        params = model.init(jax.random.key(2), x)
        key = jax.random.key(3)
        private = private_steps(model, shape[0])
        kfac_step, extra = curvature_steps(model, params, x, y)["kfac-step"]
        t = interleaved({"plain": lambda: private["step"](params, x, y, key),
                         "private": lambda: private["dp"](params, x, y, key),
                         "kfac": lambda: kfac_step(params, x, y, key, *extra)}, rounds=_rounds(9), reps=_rounds(10))
        return {"plain ms": round(t["plain"] * 1e3, 3),
                "private (noise included) / plain": round(t["private"] / t["plain"], 3),
                "kfac / plain": round(t["kfac"] / t["plain"], 3)}

    for name, workload in (("mlp", mlp_workload()), ("cnn", cnn_workload())):
        results[f"steps {name}"] = one(*workload)


PEERS = {"torch+opacus+backpack": (("torch", "opacus", "backpack"), "bench_per_example.py", "--only", "mlp,cnn"),
         "kfac-jax": (("kfac_jax",), "kfac_peers.py", "--seeds", "2"),
         "jax-privacy": (("jax_privacy",), "bench_per_example.py", "--only", "mlp")}


def section_peers(results):
    """Which peers are here; each installed set's benchmark, one run, its ratio lines."""
    import importlib.util

    for label, (modules, script, *args) in PEERS.items():
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            results[f"peer {label}"] = f"not installed ({', '.join(missing)})"
            continue
        if DRY["on"]:
            results[f"peer {label}"] = "installed (not run in a dry run)"
            continue
        out = subprocess.run([sys.executable, os.path.join(HERE, script), "--runs", "1", *args], capture_output=True,
                             text=True, timeout=1800, cwd=HERE)
        results[f"peer {label}"] = {"rc": out.returncode, "ratios": [line.strip() for line in out.stdout.splitlines()
                                                                     if "/" in line and ":" in line][-40:]}


SECTIONS = {"engine": section_engine, "sharded": section_sharded, "fit": section_fit, "speed": section_speed,
            "diagnostics": section_diagnostics, "steps": section_steps, "check": section_check, "peers": section_peers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--dry-run", action="store_true", help="every section at the smallest sizes (on a CPU)")
    args = parser.parse_args(argv)
    DRY["on"] = args.dry_run
    results = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
               "kind": jax.devices()[0].device_kind, "dry run": args.dry_run}
    print(json.dumps(results), flush=True)
    for name in args.only.split(","):
        start, before = time.perf_counter(), set(results)
        try:
            SECTIONS[name](results)
            status = "ok"
        except Exception:  # noqa: BLE001 - record and go on to the next section
            status = traceback.format_exc(limit=4)
        results[f"section {name}"] = {"status": status, "seconds": round(time.perf_counter() - start, 1)}
        print(name, json.dumps({k: v for k, v in results.items() if k not in before}, default=str), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
