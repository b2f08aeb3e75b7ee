"""Per-example gradients and norms against jax.vmap(jax.grad) of the plain forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn, per_example
from fbp.core import InputError

CCE = losses.CategoricalCrossEntropy(from_logits=True)

FAMILIES = {
    "dense": (nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3)), (6, 5), "normal"),
    "dense-over-positions": (nn.Serial(nn.Dense(7), nn.Tanh(), nn.Dense(9), nn.LastStep(), nn.Dense(3)),
                             (4, 6, 5), "normal"),
    "conv": (nn.Serial(nn.Conv2D(4, 3, strides=2), nn.ReLU(), nn.GroupNorm(2), nn.Conv2D(6, 2, padding="VALID",
                       feature_group_count=2, dilation=2), nn.Flatten(), nn.Dense(3)), (3, 7, 7, 2), "normal"),
    "conv1d-transpose": (nn.Serial(nn.Reshape((4, 4, 2)), nn.ConvTranspose2D(3, 2, strides=2), nn.Flatten(),
                                   nn.Dense(3)), (3, 32), "normal"),
    "conv1d": (nn.Serial(nn.Conv1D(4, 3, strides=2), nn.Flatten(), nn.Dense(3)), (3, 9, 2), "normal"),
    # windows wider than IM2COL_MAX_WIDTH (9·8, 5·16 > 64): made one at a time in a loop (ConvWindows)
    "conv-wide": (nn.Serial(nn.Conv2D(5, 3, strides=(2, 1), dilation=(1, 2), padding=((1, 2), (2, 1))), nn.Tanh(),
                            nn.Reshape((-1, 5)), nn.Dense(16), nn.Conv1D(4, 5, strides=2), nn.Flatten(), nn.Dense(3)),
                  (3, 7, 6, 8), "normal"),
    "recurrent-attention": (nn.Serial(nn.LSTM(6), nn.LayerNorm(), nn.MultiHeadAttention(2), nn.SimpleRNN(4),
                                      nn.LastStep(), nn.Dense(3)), (3, 5, 3), "normal"),
    "embedding-transformer": (nn.Serial(nn.Embedding(9, 6), nn.LearnedPositionalEmbedding(5),
                                        nn.TransformerBlock(2, 12), nn.GRU(5), nn.LastStep(), nn.Dense(3)),
                              (3, 5), "ids"),
    "residual-parallel": (nn.Serial(nn.Dense(6), nn.Residual(nn.Serial(nn.Dense(6), nn.ReLU())),
                                    nn.Parallel(nn.Dense(2), nn.Dense(1))), (5, 4), "normal"),
}


def _case(name, dtype=jnp.float64):
    model, shape, kind = FAMILIES[name]
    k = jax.random.PRNGKey(0)
    x = jax.random.randint(k, shape, 0, 9) if kind == "ids" else jax.random.normal(k, shape, dtype)
    y = jnp.arange(shape[0]) % 3
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), model.init(jax.random.PRNGKey(1), x))
    return model, params, x, y


def reference(model, loss, params, x, y):
    return jax.jit(jax.vmap(lambda xb, yb: jax.grad(lambda p: loss(model.apply(p, xb[None]), yb[None]))(params)))(
        x, y)


def _close(a, b, tol):
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(b))
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_matches_vmap_of_grad(name):
    with jax.enable_x64(True):
        model, params, x, y = _case(name)
        values, grads = jax.jit(per_example.grads(model, CCE))(params, x, y)
        ref = reference(model, CCE, params, x, y)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref)
        _close(grads, ref, 1e-10)
        per_example_loss = jax.jit(jax.vmap(lambda a, b: CCE(model.apply(params, a[None]), b[None])))
        np.testing.assert_allclose(values, per_example_loss(x, y), rtol=1e-12)
        _, norms, layer_norms = jax.jit(per_example.grad_norms(model, CCE, per_layer=True))(params, x, y)
        choices = per_example.routes(model, CCE, params, x, y)
        flat = jnp.sqrt(sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), 1) for a in jax.tree_util.tree_leaves(ref)))
        np.testing.assert_allclose(norms, flat, rtol=1e-10)
        assert set(layer_norms) == set(choices) and all(v.shape == (x.shape[0],) for v in layer_norms.values())
        if name == "conv-wide":  # both convolutions' per-example gradients made one window at a time
            jaxpr = str(jax.make_jaxpr(per_example.grads(model, CCE))(params, x, y))
            assert jaxpr.count("dynamic_update_slice") == 2, jaxpr  # one loop per convolution, writing G


def test_float32_jit_and_cheap_routes():
    model, params, x, y = _case("dense-over-positions", jnp.float32)
    _, norms, _ = jax.jit(per_example.grad_norms(model, CCE, per_layer=True))(params, x, y)
    choices = per_example.routes(model, CCE, params, x, y)
    ref = reference(model, CCE, params, x, y)
    flat = jnp.sqrt(sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), 1) for a in jax.tree_util.tree_leaves(ref)))
    np.testing.assert_allclose(norms, flat, rtol=2e-5)
    assert choices["0"].startswith("ghost norm") or choices["0"].startswith("materialised")
    assert choices["4"] == "norms ‖x‖‖g‖"
    # the ghost norm is chosen when positions are few and widths large, materialisation otherwise
    wide = nn.Serial(nn.Dense(64), nn.LastStep(), nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 64))
    p = wide.init(jax.random.PRNGKey(1), x)
    assert per_example.routes(wide, CCE, p, x, y[:2])["0"] == "ghost norm (T=3)"
    long = jax.random.normal(jax.random.PRNGKey(0), (2, 200, 4))
    narrow = nn.Serial(nn.Dense(2), nn.LastStep(), nn.Dense(3))
    p = narrow.init(jax.random.PRNGKey(1), long)
    assert per_example.routes(narrow, CCE, p, long, y[:2])["0"] == "materialised (T=200)"


@pytest.mark.parametrize("name", ["dense", "dense-over-positions", "embedding-transformer", "conv", "conv-wide"])
def test_sum_grad_squared_and_variance_and_a_mean_or_sum_loss(name):
    with jax.enable_x64(True):
        model, params, x, y = _case(name)
        ref = reference(model, CCE, params, x, y)
        _close(jax.jit(per_example.sum_grad_squared(model, CCE))(params, x, y),
               jax.tree_util.tree_map(lambda g: jnp.sum(g ** 2, 0), ref), 1e-10)
        _close(jax.jit(per_example.variance(model, CCE))(params, x, y),
               jax.tree_util.tree_map(lambda g: jnp.var(g, 0), ref), 1e-9)
        if name != "dense":
            return
        assert set(per_example.routes(model, CCE, params, x, y, mode="sgs").values()) == {"(x²)ᵀ(g²)"}
        summed = losses.CategoricalCrossEntropy(from_logits=True, reduction="sum")
        _close(jax.jit(per_example.grads(model, summed))(params, x, y)[1], ref, 1e-10)  # a batch of one: mean = sum
        _, plain = jax.jit(fbp.value_and_grad(model, CCE))(params, x, y)
        _close(jax.tree_util.tree_map(lambda g: g.mean(0), ref), plain, 1e-10)


def test_a_user_layer_may_bring_its_own_rule_and_otherwise_falls_back():
    @dataclasses.dataclass(frozen=True)
    class Scale(nn.Layer):
        def init(self, key, x):
            return {"s": jnp.ones(x.shape[-1], x.dtype)}

        def forward(self, params, x):
            return params["s"] * x, (x,)

        def backward(self, res, d_y):
            (x,) = res
            return {"s": (x * d_y).reshape(-1, x.shape[-1]).sum(0)}, d_y

    @dataclasses.dataclass(frozen=True)
    class ScaleWithRule(Scale):
        def per_example_grads(self, res, d_y):
            (x,) = res
            return {"s": (x * d_y).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

    @dataclasses.dataclass(frozen=True)
    class ScaleWithPositions(Scale):  # the (groups, rest) form of fbp.nn.positions
        def per_example_positions(self, res, d_y):
            (x,) = res
            return [], {("s",): (x * d_y).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}

    with jax.enable_x64(True):
        for layer, how in ((Scale(), "materialised (vmap of the layer's rules)"),
                           (ScaleWithRule(), "materialised (the layer's per_example_grads)"),
                           (ScaleWithPositions(), "materialised (the layer's per-example rule)")):
            model = nn.Serial(nn.Dense(4), layer, nn.Dense(3))
            x, y = jax.random.normal(jax.random.PRNGKey(0), (5, 3)), jnp.arange(5) % 3
            params = model.init(jax.random.PRNGKey(1), x)
            _close(per_example.grads(model, CCE)(params, x, y)[1], reference(model, CCE, params, x, y), 1e-10)
            assert per_example.routes(model, CCE, params, x, y)["1"] == how


def test_batchnorm_in_training_is_refused_with_the_path():
    model = nn.Serial(nn.Dense(4), nn.BatchNorm(), nn.Dense(3))
    x = jnp.ones((4, 3))
    params = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(InputError, match=r"at path '1'.*GroupNorm or LayerNorm"):
        per_example.grads(model, CCE, has_state=True)(params, model.init_state(params), x, jnp.arange(4) % 3)
    with pytest.raises(InputError, match="has_state=True"):
        per_example.grad_norms(model, CCE)


@dataclasses.dataclass(frozen=True)
class _WrongDense(nn.Dense):
    """A deliberately wrong per-example rule: the cotangent of the last example is dropped."""

    def per_example_positions(self, res, d_y):
        (group,), rest = super().per_example_positions(res, d_y)
        return [group._replace(g=group.g.at[-1].set(0))], rest


@dataclasses.dataclass(frozen=True)
class _PartialDense(nn.Dense):
    def per_example_positions(self, res, d_y):
        (group,), rest = super().per_example_positions(res, d_y)
        return [group._replace(bias=None)], rest


def test_the_reference_catches_a_wrong_rule_and_an_incomplete_one_is_refused():
    with jax.enable_x64(True):
        model = nn.Serial(nn.Dense(4), nn.Tanh(), nn.LastStep(), _WrongDense(3))
        x, y = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 3)), jnp.arange(5) % 3
        params = model.init(jax.random.PRNGKey(1), x)
        ref = reference(model, CCE, params, x, y)
        with pytest.raises(AssertionError):
            _close(per_example.grads(model, CCE)(params, x, y)[1], ref, 1e-6)
        flat = jnp.sqrt(sum(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), 1) for a in jax.tree_util.tree_leaves(ref)))
        assert not np.allclose(per_example.grad_norms(model, CCE)(params, x, y)[1], flat, rtol=1e-6)
        with pytest.raises(AssertionError):
            _close(per_example.sum_grad_squared(model, CCE)(params, x, y),
                   jax.tree_util.tree_map(lambda g: jnp.sum(g ** 2, 0), ref), 1e-6)
        partial = nn.Serial(nn.Dense(4), _PartialDense(3))
        with pytest.raises(InputError, match=r"does not cover every parameter.*at path '1'|at path '1'.*cover"):
            per_example.grad_norms(partial, CCE)(partial.init(jax.random.PRNGKey(1), x[:, 0]), x[:, 0], y)
