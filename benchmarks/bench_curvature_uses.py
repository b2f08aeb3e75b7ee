"""What the curvature tools cost (issue 29's speed targets), side by side in one process.

**Spectrum** (``--part spectrum``): 20 Lanczos iterations on GGN-vector products
(``fbp.spectrum.eigenvalues(fbp.spectrum.operator(...), k=1, iterations=20)``, one jitted call;
``lanczos20`` with full reorthogonalisation, ``lanczos20-local`` without) and one GGN-vector
product (``product``, the forward included) against fbp's plain SGD step, on bench_mlp.py's
MLP (784-1024³-10, batch 256), bench_cnn.py's CNN (batch 128) and bench_sequence.py's
LSTM and transformer block (``--only lstm,transformer``: hidden 256, 64 × 64 steps; d 256, 4
heads, 16 × 128 tokens); and against the same Lanczos
with the JAX idiom's GGN product (``jax.jvp`` of the model, the softmax cross-entropy's Hessian
in closed form, ``jax.vjp``), timed apart on three calls after the rounds.
Target: ``lanczos20 / step ≤ 30`` (20 iterations ≤ 20 × 1.5 plain steps). ``…-transposed``: the
same with ``J v`` by transposing the backward (``fbp.linear_pass.transpose_only``), the path before
the layers' tangent rules. ``hessian-product``: one Hessian-vector product from the layers'
second-order rules (``curvature="hessian"``, the forward included), against the JAX idiom's
forward-over-reverse product (``jax.jvp`` of ``jax.grad``). Interleaved rounds, medians, ratio ranges over ``--runs``.

**Influence** (``--part influence``): the influence of 500 test digits on the 1,257 training
digits (digits MLP 64-32-10, ``load_digits(0.3)``), with EK-FAC and with the exact dense GGN
(``fbp.influence``), against (a) ten epochs of training the same network (SGD, batch 32, one
jitted step per batch) and (b) the JAX idiom: per-example gradients by ``vmap(jax.grad)``, the
dense GGN by ``jax.jacrev`` and ``jax.hessian``, a dense solve. Each pipeline is timed whole
(for fbp: ``influence.fit`` and ``scores``) — its first call, compilation included, and then warm
in interleaved rounds (fbp's compiled batch functions are shared between fits of the same model
and shapes). Targets: fbp ≤ 10 epochs' time and ≥ 20× faster than the idiom.

**Laplace predictive** (``--part laplace``): ``Laplace.predict`` (linearised, probit) on 719
test digits, with the variances from each layer's inputs and cotangents
(``fbp.laplace.variances``) against the Jacobian route it replaced for the diagonal and
Kronecker structures — every output's per-example gradient of every layer, ``(B, C, dim)``,
rotated into ``H``'s eigenbasis (``jacobian``) — for the digits MLP 64-256-10 and a digits CNN
(two 3×3 convolutions, 8 and 16 channels), ``"diag"`` and ``"kfac"``. Both routes' outputs
are compared before timing.

**EK-FAC against the exact influence** (``--part agreement``; not a timing): the Spearman
correlation of EK-FAC's pairwise scores (20 test digits × 300 training digits) with the exact
GGN's, for the digits MLP 64-16-10 trained by full-batch AdamW for 300 steps, at four dampings
and five seeds.

Run: ``python benchmarks/bench_curvature_uses.py [--part spectrum|influence|laplace|agreement|all] [--runs 3]``.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import block, cnn_workload, lstm_workload, mlp_workload, ratio_runs, sgd, transformer_workload

import fbp
from fbp import data, influence, laplace, losses, nn, optim, second_order, spectrum
from fbp.lanczos import lanczos
from fbp.linear_pass import transpose_only

LOSS = losses.CategoricalCrossEntropy(from_logits=True)


def _jax_ggn_matvec(model, params, x, y):
    """The JAX idiom's GGN product on flat vectors: ``J v`` by ``jax.jvp``, the softmax
    cross-entropy's Hessian ``(diag p − p pᵀ)/B``, ``Jᵀ u`` by ``jax.vjp``."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda v: model.apply(unravel(v), x)  # noqa: E731
    logits, pull = jax.vjp(f, flat)
    p = jax.nn.softmax(logits)

    def matvec(v):
        jv = jax.jvp(f, (flat,), (v,))[1]
        hu = (p * jv - p * jnp.sum(p * jv, -1, keepdims=True)) / x.shape[0]
        return pull(hu)[0]

    return matvec, flat.size, flat.dtype


def spectrum_part(runs, only):
    for name, (model, shape) in {"mlp": mlp_workload(), "cnn": cnn_workload(), "lstm": lstm_workload(),
                                 "transformer": transformer_workload()}.items():
        if name in only:
            _spectrum_workload(name, model, shape, runs)


def _spectrum_workload(name, model, shape, runs):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    y = jax.random.randint(jax.random.PRNGKey(1), (shape[0],), 0, 10)
    params = model.init(jax.random.PRNGKey(2), x)
    vg = fbp.value_and_grad(model, LOSS)
    step = jax.jit(lambda p: sgd(p, vg(p, x, y)[1]))
    fbp_lanczos = jax.jit(lambda p: spectrum.eigenvalues(spectrum.operator(model, LOSS, p, x, y), 1,
                                                          iterations=20).values)
    fbp_local = jax.jit(lambda p: spectrum.eigenvalues(spectrum.operator(model, LOSS, p, x, y), 1, iterations=20,
                                                        reorthogonalize=False).values)
    ggn_product = jax.jit(lambda p, v: spectrum.operator(model, LOSS, p, x, y).matvec(v))
    v0 = jnp.ones((sum(a.size for a in jax.tree_util.tree_leaves(params)),), jnp.float32)
    with_hessian = second_order.unsupported(model) is None  # recurrent cells have no second-order term
    hessian_product = jax.jit(lambda p, v: spectrum.operator(model, LOSS, p, x, y, curvature="hessian").matvec(v))
    _, unravel = jax.flatten_util.ravel_pytree(params)
    jax_hessian_product = jax.jit(lambda p, v: jax.jvp(jax.grad(  # the JAX idiom: forward over reverse
        lambda f: LOSS(model.apply(unravel(f), x), y)), (jax.flatten_util.ravel_pytree(p)[0],), (v,))[1])
    if with_hessian:
        gap = float(jnp.max(jnp.abs(hessian_product(params, v0) - jax_hessian_product(params, v0))))
        print(f"  Hessian-vector product: fbp's rules against the JAX idiom, max |difference| {gap:.2e} "
              f"(of max |Hv| {float(jnp.max(jnp.abs(jax_hessian_product(params, v0)))):.2e})")
    with transpose_only():  # J v by transposing the backward, as before the tangent rules (traced here)
        transposed = jax.jit(lambda p: spectrum.eigenvalues(spectrum.operator(model, LOSS, p, x, y), 1,
                                                             iterations=20, reorthogonalize=False).values)
        transposed_product = jax.jit(lambda p, v: spectrum.operator(model, LOSS, p, x, y).matvec(v))
        block(transposed(params)), block(transposed_product(params, v0))

    def jax_lanczos(p):
        matvec, dim, dtype = _jax_ggn_matvec(model, p, x, y)
        return lanczos(matvec, dim, 20, jax.random.key(0), dtype).ritz()[0][-1]

    jax_lanczos = jax.jit(jax_lanczos)
    top_fbp, top_jax = float(fbp_lanczos(params)[0]), float(jax_lanczos(params))
    print(f"\n{name}: top GGN eigenvalue after 20 iterations: fbp {top_fbp:.6g}, JAX idiom {top_jax:.6g}")
    calls = {"step": lambda: step(params), "product": lambda: ggn_product(params, v0),
             "lanczos20": lambda: fbp_lanczos(params), "lanczos20-local": lambda: fbp_local(params),
             "product-transposed": lambda: transposed_product(params, v0),
             "lanczos20-local-transposed": lambda: transposed(params)}
    keys = ["product / step", "lanczos20 / step", "lanczos20-local / step", "product-transposed / step",
            "lanczos20-local-transposed / step", "product / product-transposed"]
    if with_hessian:
        calls |= {"hessian-product": lambda: hessian_product(params, v0),
                  "jax-hessian-product": lambda: jax_hessian_product(params, v0)}
        keys += ["hessian-product / step", "hessian-product / jax-hessian-product"]
    ratios = ratio_runs(calls, keys, runs, rounds=5, reps=2)
    apart = []  # the JAX idiom apart, three calls after the rounds (tens of seconds a call on the CNN)
    for _ in range(3):
        start = time.perf_counter()
        block(jax_lanczos(params))
        middle = time.perf_counter()
        block(fbp_lanczos(params))
        apart.append((middle - start) / (time.perf_counter() - middle))
    ratios["jax-lanczos20 / lanczos20 (3 calls apart)"] = apart
    for key, values in ratios.items():
        target = "   (target ≤ 30)" if key.startswith("lanczos20") and key.endswith("step") else ""
        print(f"  {key}: {min(values):.2f}–{max(values):.2f}{target}")


def _digits():
    ds = data.load_digits(0.3, seed=0)
    return (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(ds.x_test[:500]),
            jnp.asarray(ds.y_test[:500]))


def _epochs(model, params, x, y, epochs=10, batch=32):
    opt = optim.sgd(0.1)
    vg = fbp.value_and_grad(model, LOSS)

    @jax.jit
    def step(params, state, xb, yb):
        updates, state = opt.update(vg(params, xb, yb)[1], state, params)
        return optim.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(epochs):
        for start in range(0, x.shape[0] - batch + 1, batch):
            params, state = step(params, state, x[start:start + batch], y[start:start + batch])
    return block(params)


def _jax_idiom_functions(model, params):
    """The JAX idiom's jitted pieces: per-example gradients by ``vmap(jax.grad)``, the dense GGN."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    one = lambda f, xb, yb: LOSS(model.apply(unravel(f), xb[None]), yb[None])  # noqa: E731
    grads = jax.jit(jax.vmap(jax.grad(one), (None, 0, 0)))

    @jax.jit
    def ggn(f, x, y):
        out = lambda v: model.apply(unravel(v), x)  # noqa: E731
        pred = out(f)
        rows = jax.jacrev(lambda v: out(v).ravel())(f)
        h = jax.hessian(lambda z: LOSS(z.reshape(pred.shape), y))(pred.ravel())
        return rows.T @ h @ rows

    def run(params, x, y, xt, yt, damping):
        f = jax.flatten_util.ravel_pytree(params)[0]
        g = ggn(f, x, y)
        pre = jnp.linalg.solve(g + damping * jnp.eye(g.shape[0]), grads(f, xt, yt).T)
        return block(pre.T @ grads(f, x, y).T)

    return run


def influence_part(runs):
    x, y, xt, yt = _digits()
    model = nn.Serial(nn.Dense(32), nn.Tanh(), nn.Dense(10))
    params = _epochs(model, model.init(jax.random.PRNGKey(0), x[:1]), x, y, epochs=30)
    damping = 1e-3
    idiom = _jax_idiom_functions(model, params)

    def fbp_influence(method):
        return block(influence.fit(model, LOSS, params, x, y, method=method, damping=damping).scores(xt, yt))

    calls = {"10 epochs": lambda: _epochs(model, params, x, y), "ekfac": lambda: fbp_influence("ekfac"),
             "exact": lambda: fbp_influence("exact"), "jax idiom": lambda: idiom(params, x, y, xt, yt, damping)}
    cold = {}
    for name, fn in calls.items():  # the first call of each, compilation included, as a user runs it once
        start = time.perf_counter()
        fn()
        cold[name] = time.perf_counter() - start
    print("  first call (compiling): " + "   ".join(f"{k} {v:.2f} s" for k, v in cold.items()))
    exact, reference = np.asarray(fbp_influence("exact")), np.asarray(calls["jax idiom"]())
    print(f"  fbp exact vs the idiom: max |difference| / max |score| = "
          f"{np.abs(exact - reference).max() / np.abs(reference).max():.2e}")
    ratios = ratio_runs(calls, ["ekfac / 10 epochs", "exact / 10 epochs", "jax idiom / ekfac", "jax idiom / exact"],
                        runs, rounds=3, reps=1)
    for key, values in ratios.items():
        print(f"  {key} (warm): {min(values):.2f}–{max(values):.2f}")


def _jacobian_route(la):
    """The predictive before ``fbp.laplace.variances``: Jacobians ``(B, C, dim)`` rotated into
    ``H``'s eigenbasis, squared and weighed, in chunks of 256 like ``predict``."""

    @jax.jit
    def chunk(xb):
        pred, jac = la._jacobians(xb)
        var = jnp.square(jax.vmap(jax.vmap(la.hessian.spectral))(jac)) @ la._eigen_weights(la.prior_precision,
                                                                                            la.sigma_noise)
        return jax.nn.softmax(pred / jnp.sqrt(1 + np.pi / 8 * var))

    return lambda x: block(jnp.concatenate([chunk(x[lo:lo + 256]) for lo in range(0, x.shape[0], 256)]))


def laplace_part(runs):
    ds = data.load_digits(0.4, seed=0)
    x, y, xt = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), jnp.asarray(ds.x_test)
    models = {"mlp 64-256-10": (nn.Serial(nn.Dense(256), nn.Tanh(), nn.Dense(10)), x, xt),
              "cnn 8-16": (nn.Serial(nn.Conv2D(8, 3), nn.ReLU(), nn.Conv2D(16, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Dense(10)), x.reshape(-1, 8, 8, 1), xt.reshape(-1, 8, 8, 1))}
    for name, (model, xs, xts) in models.items():
        params = _epochs(model, model.init(jax.random.PRNGKey(0), xs[:1]), xs, y, epochs=5)
        for structure in ("diag", "kfac"):
            la = laplace.fit(model, LOSS, params, xs, y, structure=structure, prior_precision=1.0)
            route = _jacobian_route(la)
            calls = {"variances": lambda la=la, xts=xts: block(la.predict(xts)),
                     "jacobian": lambda route=route, xts=xts: route(xts)}
            diff = np.abs(np.asarray(calls["variances"]()) - np.asarray(calls["jacobian"]())).max()
            print(f"\n{name}, {structure} ({la.space.dim} params, max |Δp| between the routes {diff:.1e})")
            ratios = ratio_runs(calls, ["jacobian / variances"], runs, rounds=5, reps=1)
            for key, values in ratios.items():
                print(f"  {key}: {min(values):.2f}–{max(values):.2f}")


def agreement_part():
    from scipy.stats import spearmanr

    ds = data.load_digits(0.3, seed=0)
    x, y = jnp.asarray(ds.x_train[:300]), jnp.asarray(ds.y_train[:300])
    xt, yt = jnp.asarray(ds.x_test[:20]), jnp.asarray(ds.y_test[:20])
    model = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(10))
    dampings = (1.0, 0.1, 0.03, 0.01)
    opt = optim.adamw(1e-2, weight_decay=1e-2)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(fbp.value_and_grad(model, LOSS)(params, x, y)[1], state, params)
        return optim.apply_updates(params, updates), state

    print("  seed  training loss  " + "  ".join(f"λ={d:<5}" for d in dampings))
    for seed in range(5):
        params = model.init(jax.random.key(seed), x)
        state = opt.init(params)
        for _ in range(300):
            params, state = step(params, state)
        found = []
        for damping in dampings:
            exact, ek = (influence.fit(model, LOSS, params, x, y, method=m, damping=damping)
                         for m in ("exact", "ekfac"))
            found.append(spearmanr(np.ravel(ek.scores(xt, yt)), np.ravel(exact.scores(xt, yt))).statistic)
        print(f"  {seed:<5} {float(LOSS(model.apply(params, x), y)):<14.4f} " + "  ".join(f"{v:<7.3f}" for v in found))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["spectrum", "influence", "laplace", "agreement", "all"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="mlp,cnn", help="spectrum workloads: mlp, cnn, lstm, transformer")
    args = parser.parse_args()
    print(f"[{jax.devices()[0].platform}: {jax.devices()[0].device_kind}]")
    if args.part in ("spectrum", "all"):
        spectrum_part(args.runs, args.only.split(","))
    if args.part in ("influence", "all"):
        print("\ninfluence of 500 test digits on the training digits (seconds, end to end and warm)")
        influence_part(args.runs)
    if args.part in ("laplace", "all"):
        print("\nthe Laplace predictive of 719 test digits (linearised, probit)")
        laplace_part(args.runs)
    if args.part in ("agreement", "all"):
        print("\nEK-FAC's pairwise influence scores against the exact GGN's (Spearman)")
        agreement_part()


if __name__ == "__main__":
    main()
