"""fbp.linear_pass: forward mode (``J v``) from the families' tangent rules, against ``jax.jvp``
of the plain forward and against the transposed backward, with and without jit, in both
precisions; the fallback for families without rules; the declaration rule; planted errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn
from fbp.core import run_forward
from fbp.deviation import reference_model
from fbp.extensions import Extension
from fbp.linear_pass import LinearPass, has_tangent, jacobian_vector_product

KEY = jax.random.PRNGKey(0)

# MLP and CNN chains are covered by the GGN products against dense references (tests/test_curvature.py,
# tests/test_spectrum.py), which run on these rules; here, what those do not reach.
WITH_RULES = {
    "overlapping pools, transposed and 1-D convolutions": (
        lambda: nn.Serial(nn.ConvTranspose2D(3, (3, 3), strides=(2, 2)), nn.Sigmoid(),
                          nn.MaxPool2D(3, strides=2, padding="SAME"), nn.Reshape((-1, 3)), nn.Conv1D(2, (2,)),
                          nn.LeakyReLU(), nn.GlobalAvgPool(), nn.Softplus()), (2, 5, 5, 2)),
    "residual and parallel": (lambda: nn.Serial(nn.Dense(6), nn.Residual(nn.Serial(nn.Dense(6), nn.GELU())),
                                                nn.Residual(nn.Dense(4), projection=nn.Dense(4)),
                                                nn.Parallel(nn.Dense(2), nn.Identity(), nn.Serial(nn.Dense(3))),
                                                nn.Softmax()), (3, 5)),
    "embedding": (lambda: nn.Serial(nn.Embedding(11, 4), nn.Flatten(), nn.Dense(3)), (3, 2)),
    "normalisation and rules by design": (
        lambda: nn.Serial(nn.Conv2D(4, (2, 2)), nn.GroupNorm(2), nn.ScaleGradient(0.5), nn.Flatten(), nn.Dense(6),
                          nn.LayerNorm(), nn.Sign(), nn.GradientReversal(2.0), nn.Dense(3), nn.StopGradient(),
                          nn.Round(ste="hardtanh"), nn.Dense(2)), (3, 4, 4, 2)),
    "sequence": (lambda: nn.Serial(nn.Dense(4), nn.Tanh(), nn.LastStep(), nn.Dense(2)), (2, 3, 5)),
    "recurrent": (lambda: nn.Serial(nn.SimpleRNN(4), nn.LSTM(3), nn.GRU(5), nn.LastStep(), nn.Dense(2)), (2, 4, 3)),
    "attention and transformer": (
        lambda: nn.Serial(nn.Dense(4), nn.LearnedPositionalEmbedding(6), nn.SinusoidalPositionalEmbedding(),
                          nn.MultiHeadAttention(num_heads=2, causal=True), nn.TransformerBlock(2, 8), nn.LastStep(),
                          nn.Dense(3)), (2, 5, 3)),
}


def _inputs(kind, shape, dtype):
    if kind == "embedding":
        return jax.random.randint(KEY, shape, 0, 11)
    return jax.random.normal(KEY, shape, dtype)


def _direction(params, seed=1):
    return jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), a.size),
                                                              a.shape, a.dtype), params)


def _reference(model, params, x, v, **context):
    """``jax.jvp`` of the plain forward; of the rule's own equation where a layer deviates by design."""
    reference = reference_model(model)
    return jax.jvp(lambda p: reference.apply(p, x, **context), (params,), (v,))[1]


@pytest.mark.parametrize("kind", list(WITH_RULES))
def test_rules_equal_the_forward_mode_reference_and_the_transpose(kind, dtype, jit):
    build, shape = WITH_RULES[kind]
    model = build()
    x = _inputs(kind, shape, dtype)
    params = model.init(KEY, x)
    v = _direction(params)
    assert has_tangent(model)

    def both(p, v):
        pred, res = run_forward(model, p, x)
        linear = LinearPass(model, res, pred)
        return linear.tangent(v), linear.transposed(v)

    ours, transposed = (jax.jit(both) if jit else both)(params, v)
    desired = _reference(model, params, x, v)
    rtol = 1e-12 if jax.tree_util.tree_leaves(params)[0].dtype == jnp.float64 else 2e-5
    scale = float(jnp.max(jnp.abs(desired)))
    np.testing.assert_allclose(ours, desired, rtol=rtol, atol=rtol * scale)
    np.testing.assert_allclose(transposed, desired, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("train", [True, False], ids=["batch statistics", "running statistics"])
def test_batch_norm_in_both_modes(train):
    model = nn.Serial(nn.Conv2D(3, (2, 2)), nn.BatchNorm(), nn.ReLU(), nn.Flatten(), nn.Dense(2))
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (4, 3, 3, 2), jnp.float64)
        params = model.init(KEY, x)
        state = jax.tree_util.tree_map(lambda a: a + 0.3, model.init_state(params))  # running statistics ≠ the batch's
        v = _direction(params)
        pred, res = run_forward(model, params, x, state=state, train=train)
        ours = LinearPass(model, res, pred).tangent(v)
        np.testing.assert_allclose(ours, _reference(model, params, x, v, state=state, train=train), rtol=1e-11,
                                   atol=1e-12)


def test_dropout_in_training_uses_the_forwards_mask():
    model = nn.Serial(nn.Dense(8), nn.Dropout(0.5), nn.Dense(3))
    x = jax.random.normal(KEY, (4, 5))
    params, key = model.init(KEY, x), jax.random.PRNGKey(5)
    v = _direction(params)
    pred, res = run_forward(model, params, x, key=key, train=True)
    ours = LinearPass(model, res, pred).tangent(v)
    np.testing.assert_allclose(ours, _reference(model, params, x, v, key=key, train=True), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [nn.SimpleRNN(3), nn.LSTM(3), nn.GRU(3)], ids=repr)
def test_recurrent_rules_with_an_initial_state_and_its_tangent(layer):
    """``(x, h0)`` (``(x, (h0, c0))`` for the LSTM) with tangents of the input and the initial state."""
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (2, 4, 5), jnp.float64)
        carry = jax.random.normal(jax.random.PRNGKey(7), (2, 3), jnp.float64)
        carry = (carry, -carry) if isinstance(layer, nn.LSTM) else carry
        params = layer.init(KEY, (x, carry))
        v, t_x, t_carry = _direction(params), _direction(x, 2), _direction(carry, 3)
        _, res = run_forward(layer, params, (x, carry))
        ours = layer.tangent(res, v, (t_x, t_carry))
        desired = jax.jvp(lambda p, a, c: layer.apply(p, (a, c)), (params, x, carry), (v, t_x, t_carry))[1]
        np.testing.assert_allclose(ours, desired, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(desired))))


def test_attention_with_a_padding_mask_and_no_input_tangent():
    """``(x, mask)`` inputs (the mask has no tangent), and a first layer whose input tangent is zero."""
    with jax.enable_x64(True):
        _masked_attention_against_jvp()


def _masked_attention_against_jvp():
    x = jax.random.normal(KEY, (3, 5, 4), jnp.float64)
    mask = jnp.array([[True] * 5, [True, True, True, False, False], [False, True, True, True, True]])
    for layer in (nn.MultiHeadAttention(num_heads=2), nn.TransformerBlock(2, 6, causal=True)):
        params = layer.init(KEY, (x, mask))
        v = _direction(params)
        pred, res = run_forward(layer, params, (x, mask))
        assert has_tangent(layer)
        ours = LinearPass(layer, res, pred).tangent(v)
        desired = jax.jvp(lambda p, layer=layer: layer.apply(p, (x, mask)), (params,), (v,))[1]
        np.testing.assert_allclose(ours, desired, rtol=1e-12, atol=1e-12 * float(jnp.max(jnp.abs(desired))))


@pytest.mark.parametrize("model", [nn.Serial(nn.LSTM(4), nn.MapCotangent(jnp.negative), nn.LastStep(), nn.Dense(2)),
                                   nn.Serial(nn.Dense(4), nn.Residual(nn.Serial(nn.Dense(4),
                                                                                nn.MapCotangent(jnp.negative))),
                                             nn.Dense(2))],
                         ids=["cotangent map", "cotangent map in a residual"])
def test_a_model_with_a_layer_without_rules_transposes_the_backward(model):
    x = jax.random.normal(KEY, (2, 3, 5))
    params = model.init(KEY, x)
    v = _direction(params)
    pred, res = run_forward(model, params, x)
    linear = LinearPass(model, res, pred)
    assert not has_tangent(model) and not linear.forward_mode
    np.testing.assert_array_equal(linear.tangent(v), linear.transposed(v))


def test_a_subclass_that_replaces_the_backward_loses_forward_mode():
    @dataclasses.dataclass(frozen=True)
    class Halved(nn.Dense):
        def backward(self, res, d_y):
            d_params, d_x = super().backward(res, d_y)
            return d_params, d_x / 2  # a rule of its own: Dense's tangent is no longer its transpose

    @dataclasses.dataclass(frozen=True)
    class Renamed(nn.Dense):  # the backward untouched: Dense's tangent still holds
        pass

    assert not has_tangent(Halved(3)) and has_tangent(Renamed(3))
    assert not has_tangent(nn.Serial(nn.Dense(3), Halved(3)))
    model = nn.Serial(nn.Dense(4), nn.Tanh(), Halved(2))
    x = jax.random.normal(KEY, (3, 5))
    params = model.init(KEY, x)
    pred, res = run_forward(model, params, x)
    linear, u, v = LinearPass(model, res, pred), jax.random.normal(KEY, (3, 2)), _direction(params)
    jv = linear.tangent(v)  # still the rules' J: ⟨J v, u⟩ = ⟨v, Jᵀ u⟩
    lhs = float(jnp.vdot(jv, u))
    rhs = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree_util.tree_leaves(v),
                                                     jax.tree_util.tree_leaves(linear(u)), strict=True))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5)


def test_zero_tangents_skip_their_products():
    model = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(8), nn.Tanh(), nn.Dense(3))
    x = jax.random.normal(KEY, (4, 5))
    params = model.init(KEY, x)
    pred, res = run_forward(model, params, x)
    linear = LinearPass(model, res, pred)
    jaxpr = str(jax.make_jaxpr(linear.tangent)(_direction(params)))
    assert jaxpr.count("dot_general") == 5  # x dW₁; then h dWₖ and t Wₖ for k = 2, 3: the input's tangent is zero
    only_last = jax.tree_util.tree_map(jnp.zeros_like, params)
    only_last = (*only_last[:4], params[4])
    np.testing.assert_allclose(linear.tangent(only_last), _reference(model, params, x, only_last), rtol=1e-5,
                               atol=1e-6)


def test_the_engine_pass_runs_forward_mode_through_its_probes():
    model = nn.Serial(nn.Conv2D(3, (3, 3)), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(), nn.Dense(3))
    x, y = jax.random.normal(KEY, (3, 8, 8, 2)), jnp.array([0, 2, 1])
    params = model.init(KEY, x)
    v = _direction(params)
    seen = {}

    @dataclasses.dataclass(frozen=True, eq=False)
    class Jv(Extension):
        name = "jv"
        needs = "backward"
        requires_independence = False

        def from_pass(self, back, pred, loss, y, params):
            seen.update(forward_mode=back.forward_mode, jv=jacobian_vector_product(back, pred, v),
                        transposed=back.transposed(v))  # eager: concrete arrays
            return jax.tree_util.tree_map(jnp.zeros_like, params)

        def finalize(self, found, context):
            return {}

    loss = losses.CategoricalCrossEntropy(from_logits=True)
    fbp.value_and_grad(model, loss, extensions=[Jv()])(params, x, y)
    assert seen["forward_mode"]
    desired = _reference(model, params, x, v)
    for got in (seen["jv"], seen["transposed"]):
        np.testing.assert_allclose(got, desired, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(desired))))


@dataclasses.dataclass(frozen=True)
class _ForgetsTheBias(nn.Dense):
    def backward(self, res, d_y):  # written here, so the tangent below is this class's rule
        return super().backward(res, d_y)

    def tangent(self, res, d_params, d_x):
        x, w = res
        return x @ d_params["w"] + (0 if d_x is None else d_x @ w)  # planted: no d_b


@dataclasses.dataclass(frozen=True)
class _TransposesTheKernel(nn.Dense):
    def backward(self, res, d_y):
        return super().backward(res, d_y)

    def tangent(self, res, d_params, d_x):
        x, w = res
        return x @ d_params["w"] + d_params["b"] + (0 if d_x is None else d_x[..., :w.shape[1]] @ w.T[:, :w.shape[1]])


@pytest.mark.parametrize("layer", [_ForgetsTheBias(4), _TransposesTheKernel(4)], ids=["no bias", "transposed kernel"])
def test_the_checker_catches_a_wrong_tangent_rule(layer):
    x = jax.random.normal(KEY, (3, 4))
    params = nn.Dense(4).init(KEY, x)
    report = fbp.check.layer(layer, params, x)
    rows = {r.path: r for r in report.rows if r.path == "tangent"}
    assert not rows["tangent"].ok and not report.ok
    assert fbp.check.layer(nn.Dense(4), params, x).ok  # the right rule passes, with its tangent row
    assert any(r.path == "tangent" for r in fbp.check.layer(nn.Dense(4), params, x).rows)
