"""Mixed precision: bfloat16 layers against float32, training accuracy, dynamic loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import data, losses, nn, optim, precision, train
from fbp.core import run_forward

CCE = losses.CategoricalCrossEntropy(from_logits=True)
LAYERS = {
    "dense": (nn.Dense(16), (8, 12)),
    "conv": (nn.Conv2D(6, 3), (2, 7, 7, 4)),
    "conv-wide": (nn.Conv2D(8, 3, strides=2), (2, 9, 9, 16)),  # the per-offset kernel-gradient loop
    "layernorm": (nn.LayerNorm(), (4, 5, 16)),
    "groupnorm": (nn.GroupNorm(2), (2, 4, 4, 8)),
    "batchnorm": (nn.BatchNorm(), (16, 8)),
    "softmax": (nn.Softmax(), (4, 10)),
    "logsoftmax": (nn.LogSoftmax(), (4, 10)),
    "gelu": (nn.GELU(), (4, 10)),
    "maxpool": (nn.MaxPool2D(2), (2, 6, 6, 3)),
    "lstm": (nn.LSTM(8), (3, 6, 5)),
    "gru": (nn.GRU(8), (3, 6, 5)),
    "attention": (nn.MultiHeadAttention(2), (2, 6, 16)),
    "transformer": (nn.TransformerBlock(2, 32), (2, 6, 16)),
}


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("name", list(LAYERS))
def test_each_layers_bfloat16_backward_is_within_2e_2_of_float32(name):
    layer, shape = LAYERS[name]
    kx, kp, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape)
    params = layer.init(kp, x)
    context = {"state": layer.init_state(params), "train": True} if layer.has_state else {}

    @jax.jit
    def vjp(params, x, d_y):
        y, res = run_forward(layer, params, x, **context)
        return y, layer.backward(res, d_y.astype(y.dtype))

    d_y = jax.random.normal(kd, jax.eval_shape(lambda p, x: run_forward(layer, p, x, **context)[0], params, x).shape)
    y32, (dp32, dx32) = vjp(params, x, d_y)
    to16 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), t)  # noqa: E731
    y16, (dp16, dx16) = vjp(to16(params), to16(x), to16(d_y))
    assert y16.dtype == jnp.bfloat16 and dx16.dtype == jnp.bfloat16  # no silent promotion to float32
    assert _relative(y16, y32) <= 2e-2
    assert _relative(dx16, dx32) <= 2e-2
    # per leaf, relative to the leaf — plus a floor at 1e-3 of the layer's largest gradient, for
    # gradients that are zero exactly (attention's key bias: softmax ignores a shift of every score)
    floor = 1e-3 * max((np.linalg.norm(np.asarray(b, np.float64)) for b in jax.tree_util.tree_leaves(dp32)), default=0)
    for a, b in zip(jax.tree_util.tree_leaves(dp16), jax.tree_util.tree_leaves(dp32), strict=True):
        err = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert a.dtype == jnp.bfloat16 and err <= 2e-2 * np.linalg.norm(np.asarray(b, np.float64)) + floor


def test_policy_text_and_errors():
    p = precision.Policy.parse("params=float32,compute=bfloat16,output=float32")
    assert (p.params, p.compute, p.output) == (jnp.float32, jnp.bfloat16, jnp.float32)
    assert precision.Policy.parse("float16").compute == jnp.float16 and str(p) == \
        "params=float32,compute=bfloat16,output=float32"
    with pytest.raises(ValueError, match="unknown part 'weights'"):
        precision.Policy.parse("weights=float32")
    with pytest.raises(ValueError, match="compute must be a floating dtype"):
        precision.Policy(compute=jnp.int32)
    with pytest.raises(TypeError, match="precision must be an fbp.precision.Policy"):
        train.make_step(nn.Dense(2), CCE, optim.sgd(0.1), precision=3)


def test_bfloat16_training_keeps_float32_masters_and_matches_float32_accuracy():
    ds = data.load_digits(seed=0)
    model = nn.Serial(nn.Dense(64), nn.ReLU(), nn.LayerNorm(), nn.Dense(10))
    params = model.init(jax.random.PRNGKey(0), ds.x_train[:2])
    kw = dict(key=jax.random.PRNGKey(1), epochs=15, batch_size=64, progress=False)
    full = train.fit(model, CCE, optim.adam(3e-3), params, ds.x_train, ds.y_train, **kw)
    mixed = train.fit(model, CCE, optim.adam(3e-3), params, ds.x_train, ds.y_train, precision="bfloat16", **kw)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves((mixed.params, mixed.opt_state))
               if jnp.issubdtype(a.dtype, jnp.floating))
    acc = [train.evaluate(model, CCE, r.params, ds.x_test, ds.y_test)["accuracy"] for r in (full, mixed)]
    assert acc[0] > 0.9 and abs(acc[0] - acc[1]) <= 0.01, acc


def test_loss_scaling_skips_a_non_finite_step_and_adapts_the_scale():
    opt = precision.loss_scaled(optim.adam(1e-2), init_scale=8.0, period=2)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0])}
    updates, after = opt.update(bad, state, params)
    assert np.all(np.asarray(optim.apply_updates(params, updates)["w"]) == 1.0)  # params unchanged
    assert float(after.scale) == 4.0 and int(after.finite_steps) == 0
    for a, b in zip(jax.tree_util.tree_leaves(after.inner), jax.tree_util.tree_leaves(state.inner), strict=True):
        np.testing.assert_array_equal(a, b)  # the inner optimizer did not count the skipped step
    good = {"w": jnp.array([4.0, 4.0, 4.0])}
    _, s1 = opt.update(good, after, params)
    _, s2 = opt.update(good, s1, params)
    assert float(s1.scale) == 4.0 and float(s2.scale) == 8.0  # doubled after `period` finite steps
    # float16 through make_step: the backward is seeded with the scale and the update unscaled
    model = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3))
    x, y = jax.random.normal(jax.random.PRNGKey(0), (16, 4)), jnp.arange(16) % 3
    p0 = model.init(jax.random.PRNGKey(1), x)
    sgd = precision.loss_scaled(optim.sgd(0.1), init_scale=2.0**10)
    step = train.make_step(model, CCE, sgd, precision="params=float32,compute=float16,output=float32")
    p1, s, value = step(p0, sgd.init(p0), x, y)
    ref, _, _ = train.make_step(model, CCE, optim.sgd(0.1))(p0, optim.sgd(0.1).init(p0), x, y)
    assert np.isfinite(float(value)) and float(s.scale) == 2.0**10
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(ref), strict=True):
        assert a.dtype == jnp.float32 and np.allclose(a, b, atol=5e-3)
