"""Run by tests/test_parallel.py in a subprocess with 8 simulated CPU devices (the device count
must be fixed before JAX starts). Prints one JSON object of measurements."""

import json
import os

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
os.environ["XLA_FLAGS"] = " ".join([*_flags, "--xla_force_host_platform_device_count=8"])  # the caller's flags kept
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import fbp  # noqa: E402
from fbp import losses, nn, optim, parallel, train  # noqa: E402

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MLP = nn.Serial(nn.Dense(32), nn.Tanh(), nn.Dropout(0.2), nn.Dense(4))
CNN = nn.Serial(nn.Conv2D(8, 3, use_bias=False), nn.BatchNorm(), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(),
                nn.Dense(4))


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
               for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def data(shape, n=64, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, (n, *shape)), jax.random.randint(k2, (n,), 0, 4)


def run_steps(model, opt, params, x, y, steps, mesh, has_state=False):
    step = train.make_step(model, CCE, opt, has_state=has_state, mesh=mesh)
    carried = (params, model.init_state(params)) if has_state else (params,)
    carried = (*carried, opt.init(params))
    for i in range(steps):
        key = jax.random.PRNGKey(100 + i) if model.needs_key else None
        sl = slice((i % 4) * 16, (i % 4) * 16 + 16)
        out = step(*carried, x[sl], y[sl], key=key)
        carried = out[:-1]
    return carried, step


out = {"devices": jax.device_count()}
mesh = parallel.data_mesh()

# one SGD step in float64: 8 devices vs 1
with jax.enable_x64(True):
    x, y = data((6,))
    x = x.astype(jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), MLP.init(jax.random.PRNGKey(1), x))
    one, _ = run_steps(MLP, optim.sgd(0.1), params, x, y, 1, None)
    eight, _ = run_steps(MLP, optim.sgd(0.1), params, x, y, 1, mesh)
    out["f64_one_step"] = max_diff(one, eight)

# 20 Adam steps in float32: the MLP with dropout, the CNN with BatchNorm (state over the global batch)
x, y = data((6,))
params = MLP.init(jax.random.PRNGKey(1), x)
one, _ = run_steps(MLP, optim.adam(1e-2), params, x, y, 20, None)
eight, step = run_steps(MLP, optim.adam(1e-2), params, x, y, 20, mesh)
out["mlp_adam20"] = max_diff(one, eight)
out["compilations"] = step.jitted._cache_size()
out["params_sharding"] = str(jax.tree_util.tree_leaves(eight[0])[0].sharding.spec)
xi, yi = data((8, 8, 3))
params = CNN.init(jax.random.PRNGKey(1), xi)
one, _ = run_steps(CNN, optim.adam(1e-2), params, xi, yi, 20, None, has_state=True)
eight, _ = run_steps(CNN, optim.adam(1e-2), params, xi, yi, 20, mesh, has_state=True)
out["cnn_bn_adam20"] = max_diff(one, eight)

# donation: the buffers passed in are consumed
step = train.make_step(MLP, CCE, optim.sgd(0.1), mesh=mesh)
p0 = parallel.place(MLP.init(jax.random.PRNGKey(1), x), parallel.replicated(mesh))
o0 = parallel.place(optim.sgd(0.1).init(p0), parallel.replicated(mesh))
step(p0, o0, x[:16], y[:16], key=jax.random.PRNGKey(0))
out["donated"] = all(a.is_deleted() for a in jax.tree_util.tree_leaves(p0))

# fit over the mesh equals fit on one device (dropout masks and shuffles from the same key)
kw = dict(key=jax.random.PRNGKey(5), epochs=3, batch_size=16, progress=False, validation_split=0.25)
params = MLP.init(jax.random.PRNGKey(1), x)
a = train.fit(MLP, CCE, optim.adam(1e-2), params, x, y, **kw)
b = train.fit(MLP, CCE, optim.adam(1e-2), params, x, y, mesh=mesh, **kw)
out["fit_params"] = max_diff(a.params, b.params)
out["fit_history"] = max(abs(float(u) - float(v)) for k in ("loss", "val_loss") for u, v in zip(a.history[k],
                                                                                                b.history[k]))

# FSDP-style: large leaves split, same numbers
# In float64: Adam's first step, lr * g / (|g| + eps), turns the float32 rounding of a gradient
# entry near eps into a difference of a few per cent of lr, which says nothing about the sharding.
big = nn.Serial(nn.Dense(512), nn.Tanh(), nn.Dense(512), nn.Tanh(), nn.Dense(4))  # one 2^18-element kernel
with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), big.init(jax.random.PRNGKey(1), x64))
    ref = train.make_step(big, CCE, optim.adam(1e-3))(params, optim.adam(1e-3).init(params), x64[:16], y[:16])
    step = train.make_step(big, CCE, optim.adam(1e-3), mesh=mesh, fsdp=True)
    p, o, _ = step(params, optim.adam(1e-3).init(params), x64[:16], y[:16])  # consumes params (donated)
    out["fsdp_spec"] = str(p[2]["w"].sharding.spec)
    out["fsdp_diff"] = max_diff(p, ref[0])


# negative control: each device updates from its own shard's gradient, no cross-device mean
def local_step(params, xb, yb):
    _, g = fbp.value_and_grad(MLP, CCE)(params, xb, yb, key=jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda p, d: p - 0.1 * d, params, g)


with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), MLP.init(jax.random.PRNGKey(1), x64))
    bad = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P(),
                                check_vma=False))(params, x64[:16], y[:16])
    good = train.make_step(MLP, CCE, optim.sgd(0.1))(params, optim.sgd(0.1).init(params), x64[:16], y[:16],
                                                     key=jax.random.PRNGKey(0))[0]
    out["control_no_mean"] = max_diff(bad, good)

# DP-SGD and K-FAC in fit over 4 devices equal one device (float64: the sums differ only in order)
from fbp import kfac, privacy  # noqa: E402

four = parallel.data_mesh(4)
plain = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(4))
with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), plain.init(jax.random.PRNGKey(1), x64))
    kw = dict(key=jax.random.PRNGKey(6), epochs=2, batch_size=16, progress=False)
    for sampling in ("poisson", "fixed"):
        spec = privacy.DPSGD(l2_clip=0.5, noise_multiplier=1.0, sampling=sampling)
        a = train.fit(plain, CCE, optim.sgd(0.1), params, x64, y, privacy=spec, **kw)
        b = train.fit(plain, CCE, optim.sgd(0.1), params, x64, y, privacy=spec, mesh=four, **kw)
        out[f"private_{sampling}"] = max_diff(a.params, b.params)
        out[f"private_{sampling}_epsilon"] = [float(a.history["epsilon"][-1]), float(b.history["epsilon"][-1])]
    k = kfac.kfac(plain, CCE, optim.sgd(0.05, momentum=0.9), mc_samples=None)
    a = train.fit(plain, CCE, k, params, x64, y, **kw)
    b = train.fit(plain, CCE, k, params, x64, y, mesh=four, **kw)
    out["kfac_fit"] = max_diff(a.params, b.params)
    # training diagnostics inside the sharded step: the same record as one device
    a = train.fit(plain, CCE, optim.sgd(0.1), params, x64, y, diagnostics="full", **kw)
    b = train.fit(plain, CCE, optim.sgd(0.1), params, x64, y, diagnostics="full", mesh=four, **kw)
    flat = lambda r: [v for s in sorted(r.diagnostics) for v in jax.tree_util.tree_leaves(r.diagnostics[s])]  # noqa
    out["diagnostics_fit"] = max(max_diff(a.params, b.params), max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v)) / (1 + np.abs(np.asarray(u)))))
        for u, v in zip(flat(a), flat(b), strict=True)))

# a batch the 8 devices cannot share
try:
    train.make_step(MLP, CCE, optim.sgd(0.1), mesh=mesh)(MLP.init(jax.random.PRNGKey(1), x), optim.sgd(0.1).init(
        MLP.init(jax.random.PRNGKey(1), x)), x[:12], y[:12], key=jax.random.PRNGKey(0))
    out["indivisible"] = "no error"
except ValueError as e:
    out["indivisible"] = str(e)

print(json.dumps(out))
