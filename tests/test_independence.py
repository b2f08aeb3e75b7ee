"""Batch independence: declared by every built-in, measured for a user's layer, enforced before
every per-example and private computation (issue 26: no silent privacy leak)."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fbp import catalog, independence, losses, nn, optim, per_example, privacy, train
from fbp.core import InputError, Layer, children

CCE = losses.CategoricalCrossEntropy(from_logits=True)


# --------------------------------------------------------------------------- a user's layer, three ways
@dataclasses.dataclass(frozen=True)
class UserScale(Layer):
    """``z = x ⊙ w`` then a batch-mixing term by ``kind``: ``"none"`` (independent), ``"center"``
    (``z - mean_b z``), ``"roll"`` (``z + ½ z`` of the previous example) or ``"max"``
    (``z + max_b z``, which only a perturbation that becomes the maximum shows)."""

    kind: str = "none"

    def init(self, key, x):
        return {"w": 1.0 + 0.1 * jax.random.normal(key, x.shape[-1:], x.dtype)}

    def forward(self, params, x):
        z = x * params["w"]
        if self.kind == "center":
            return z - z.mean(0), (x, params["w"])
        if self.kind == "roll":
            return z + 0.5 * jnp.roll(z, 1, axis=0), (x, params["w"])
        if self.kind == "max":
            return z + z.max(0), (x, params["w"], z)
        return z, (x, params["w"])

    def backward(self, res, d_y):
        x, w = res[:2]
        if self.kind == "center":
            d_z = d_y - d_y.mean(0)
        elif self.kind == "roll":
            d_z = d_y + 0.5 * jnp.roll(d_y, -1, axis=0)
        elif self.kind == "max":
            z = res[2]
            at_max = (z == z.max(0)).astype(d_y.dtype)
            d_z = d_y + at_max * d_y.sum(0)
        else:
            d_z = d_y
        return {"w": jnp.sum(d_z * x, axis=tuple(range(x.ndim - 1)))}, d_z * w


@dataclasses.dataclass(frozen=True)
class CenteredDense(nn.Dense):
    """A subclass of a declared built-in that replaces the forward with a batch-mixing one."""

    def forward(self, params, x):
        y, res = super().forward(params, x)
        return y - y.mean(0), res

    def backward(self, res, d_y):
        return super().backward(res, d_y - d_y.mean(0))


def _leaves(layer):
    kids = children(layer)
    if not kids:
        return [layer]
    return [leaf for kid in kids.values() for leaf in _leaves(kid)]


# --------------------------------------------------------------------------- declarations
def test_every_built_in_leaf_declares_and_the_declaration_agrees_with_a_measurement():
    cases = [(layer, shape, {"train": False}) for layer, shape in catalog.layers()]
    cases += [(layer, shape, ctx) for layer, shape, ctx in catalog.contextual_layers()]
    checked = 0
    for model, shape, ctx in cases:
        for leaf in _leaves(model):
            ids = "vocab" in ctx
            x = jax.ShapeDtypeStruct(shape, jnp.int32 if ids else jnp.float32)
            for mode in (False, True) if leaf.contextual else (True,):  # the mode reaches contextual ones only
                said = independence.declared(leaf, mode)
                seen, how = independence.measured(leaf, x, train=mode)
                if isinstance(leaf, nn.MapCotangent):  # a user's function: undeclared, measured
                    assert said is None and seen, how
                    continue
                assert said is not None, f"{leaf!r} declares nothing"
                assert said == seen, f"{leaf!r} (train={mode}) declares {said}, measured {seen}: {how}"
                checked += 1
    assert checked > 50
    assert independence.declared(nn.BatchNorm(), True) is False and independence.declared(nn.BatchNorm(), False)
    assert independence.declared(nn.Softmax(axis=0), False) is False
    assert independence.measured(nn.Softmax(axis=0), jax.ShapeDtypeStruct((4, 3), jnp.float32), train=False)[0] is False


def test_a_declaration_is_not_inherited_by_a_subclass_that_replaces_the_forward():
    assert independence.declared(nn.Dense(3), True) is True
    assert independence.declared(CenteredDense(3), True) is None
    seen, how = independence.measured(CenteredDense(3), jax.ShapeDtypeStruct((5, 4), jnp.float32), train=True)
    assert not seen and "moved example" in how


@pytest.mark.parametrize("kind", ["center", "roll", "max"])
def test_the_measurement_catches_each_way_of_mixing(kind):
    seen, how = independence.measured(UserScale(kind), jax.ShapeDtypeStruct((6, 3), jnp.float32), train=True)
    assert not seen, how
    assert independence.measured(UserScale(), jax.ShapeDtypeStruct((6, 3), jnp.float32), train=True)[0]


def test_a_hook_that_mixes_the_batch_in_its_backward_is_caught():
    normalise = nn.MapCotangent(lambda g: g / (jnp.linalg.norm(g) + 1e-8), name="unit")  # over the whole batch
    seen, how = independence.measured(normalise, jax.ShapeDtypeStruct((5, 3), jnp.float32), train=True)
    assert not seen and "input cotangent" in how


# --------------------------------------------------------------------------- enforcement
def _mixing_model(kind="center"):
    return nn.Serial(nn.Dense(4), nn.Tanh(), UserScale(kind), nn.Dense(3))


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.PRNGKey(0), (40, 5))
    return x, jnp.arange(40) % 3


def test_every_per_example_and_private_entry_point_refuses_a_mixing_layer(data):
    x, y = data
    model = _mixing_model()
    params = model.init(jax.random.PRNGKey(1), x)
    pattern = r"UserScale\(kind='center'\) at path '2': mixes the examples of a batch in training mode \(measured"
    for f in (per_example.grads(model, CCE), per_example.grad_norms(model, CCE),
              per_example.sum_grad_squared(model, CCE), per_example.variance(model, CCE),
              privacy.clipped_grad(model, CCE, 1.0)):
        with pytest.raises(InputError, match=pattern):
            jax.jit(f)(params, x[:8], y[:8])
    with pytest.raises(InputError, match=pattern):
        privacy.private_grad(model, CCE, 1.0, 1.0, 8)(params, x[:8], y[:8], noise_key=jax.random.PRNGKey(2))


def test_fit_with_privacy_refuses_a_mixing_model_before_training_and_reports_no_epsilon(data):
    x, y = data
    model = _mixing_model("roll")
    params = model.init(jax.random.PRNGKey(1), x)
    with pytest.raises(InputError, match=r"at path '2': mixes the examples"):
        train.fit(model, CCE, optim.sgd(0.1), params, x, y, key=jax.random.PRNGKey(3), epochs=2, batch_size=8,
                  progress=False, privacy=privacy.DPSGD(l2_clip=1.0, noise_multiplier=1.0))
    independent = nn.Serial(nn.Dense(4), nn.Tanh(), UserScale(), nn.Dense(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.fit(independent, CCE, optim.sgd(0.1), independent.init(jax.random.PRNGKey(1), x), x, y,
                           key=jax.random.PRNGKey(3), epochs=1, batch_size=8, progress=False,
                           privacy=privacy.DPSGD(l2_clip=1.0, noise_multiplier=1.0))
    assert np.isfinite(result.history["epsilon"][-1])


# --------------------------------------------------------------------------- property (hypothesis)
BUILT_INS = [lambda: nn.Dense(4), lambda: nn.Tanh(), lambda: nn.ReLU(), lambda: nn.LayerNorm(), lambda: nn.GELU(),
             lambda: nn.Dense(4, use_bias=False), lambda: nn.Residual(nn.Serial(nn.Dense(4), nn.Tanh()))]


def _reference(model, params, x, y):
    def one(xb, yb):
        return jax.grad(lambda p: CCE(model.apply(p, xb[None]), yb[None]))(params)

    return jax.vmap(one)(x, y)


@given(picks=st.lists(st.integers(0, len(BUILT_INS) - 1), min_size=1, max_size=3), at=st.integers(0, 3),
       kind=st.sampled_from(["none", "none", "center", "roll", "max"]), batch=st.integers(2, 5),
       seed=st.integers(0, 2**16))
def test_property_per_example_grads_equal_vmap_of_grad_or_the_private_step_refuses(picks, at, kind, batch, seed):
    layers = [nn.Dense(4)] + [BUILT_INS[i]() for i in picks]
    layers.insert(min(at, len(layers)), UserScale(kind))
    model = nn.Serial(*layers, nn.Dense(3))
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 5), jnp.float64)
        y = jnp.arange(batch) % 3
        params = model.init(jax.random.PRNGKey(seed + 1), x)
        private = privacy.private_grad(model, CCE, 1.0, 1.0, batch)
        if kind != "none":
            with pytest.raises(InputError, match="mixes the examples of a batch"):
                private(params, x, y, noise_key=jax.random.PRNGKey(0))
            with pytest.raises(InputError, match="mixes the examples of a batch"):
                per_example.grads(model, CCE)(params, x, y)
            return
        _, grads = per_example.grads(model, CCE)(params, x, y)
        ref = _reference(model, params, x, y)
        for u, v in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-11)
        private(params, x, y, noise_key=jax.random.PRNGKey(0))  # runs


def test_a_layer_whose_own_nans_stay_put_is_not_called_mixing():
    """log of a random normal input is NaN at fixed places: the NaN pattern of the other examples
    does not move, so the layer is independent; adding the batch mean makes it mixing."""
    from fbp.core import ParameterFree

    @dataclasses.dataclass(frozen=True)
    class Log(ParameterFree):
        mix: bool = False

        def _forward(self, x):
            return jnp.log(x) + (x.mean(0) if self.mix else 0.0), x

        def _backward(self, x, d_y):
            return d_y / x + (d_y.mean(0) if self.mix else 0.0)

    shape = jax.ShapeDtypeStruct((5, 3), jnp.float32)
    assert independence.measured(Log(), shape, train=True)[0]
    assert not independence.measured(Log(mix=True), shape, train=True)[0]
