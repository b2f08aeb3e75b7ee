"""fbp.second_order: Hessian-vector products from the layers' hand-written second-order rules,
against ``jax.hessian`` of the plain loss (dense, float64 tight, float32 under jit), the
families ``fbp.check.curvature`` does not reach (softmax and log-softmax inside the network,
Embedding, transposed and 1-D convolutions, Parallel, Dropout in training, attention, the
transformer block, positional embeddings), planted errors, and the refusal of a layer without a
rule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fbp
from fbp import curvature, losses, nn

KEY = jax.random.PRNGKey(0)
CE = losses.CategoricalCrossEntropy(from_logits=True)

MODELS = {
    "softmax inside": (nn.Serial(nn.Dense(5), nn.Softmax(), nn.Dense(4), nn.SiLU(), nn.Dense(3), nn.LogSoftmax()),
                       (4, 3), losses.MSE()),
    "embedding and parallel": (nn.Serial(nn.Embedding(7, 3), nn.Flatten(), nn.Parallel(nn.Dense(2), nn.Serial(
        nn.Dense(3), nn.ELU(), nn.Dense(2))), nn.GELU(), nn.Dense(3)), (4, 2), CE),
    "transposed and 1-D convolutions": (nn.Serial(nn.ConvTranspose2D(2, (2, 2), strides=(2, 2)), nn.Tanh(),
                                                  nn.Reshape((-1, 2)), nn.Conv1D(3, (3,), strides=2), nn.Sigmoid(),
                                                  nn.GlobalAvgPool(), nn.Dense(3)), (2, 3, 3, 1), CE),
    "recurrent": (nn.Serial(nn.Dense(3), nn.Tanh(), nn.SimpleRNN(4), nn.LSTM(3), nn.GRU(4), nn.Flatten(), nn.Dense(3)),
                  (2, 4, 3), CE),
    "attention and transformer": (nn.Serial(nn.Dense(4), nn.LearnedPositionalEmbedding(6),  # (bare attention:
                                            nn.SinusoidalPositionalEmbedding(),  # the padding-mask test below)
                                            nn.TransformerBlock(2, 6, causal=True), nn.LastStep(), nn.Dense(3)),
                                  (2, 5, 3), CE),
}


def _problem(kind, dtype):
    model, shape, loss = MODELS[kind]
    x = jax.random.randint(KEY, shape, 0, 7) if kind.startswith("embedding") else jax.random.normal(KEY, shape, dtype)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), model.init(KEY, x))
    pred = jax.eval_shape(model.apply, params, x)
    y = (jax.random.normal(KEY, pred.shape, dtype) if isinstance(loss, losses.MSE)
         else jax.random.randint(KEY, pred.shape[:-1], 0, pred.shape[-1]))
    v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.fold_in(KEY, a.size), a.shape, a.dtype), params)
    return model, loss, params, x, y, v


def _dense_hessian_times(model, loss, params, x, y, v, **context):
    flat, unravel = ravel_pytree(params)
    full = jax.hessian(lambda f: loss(model.apply(unravel(f), x, **context), y))(flat)
    return full @ ravel_pytree(v)[0]


@pytest.mark.parametrize("kind", list(MODELS))
def test_products_equal_the_dense_hessian(kind, dtype, jit):
    model, loss, params, x, y, v = _problem(kind, dtype)
    product = curvature.hessian_vector_product(model, loss)
    ours = ravel_pytree((jax.jit(product) if jit else product)(params, x, y, v))[0]
    with jax.enable_x64(True):
        p64, v64 = (jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), t) for t in (params, v))
        x64 = x if x.dtype.kind == "i" else x.astype(jnp.float64)
        y64 = y if y.dtype.kind == "i" else y.astype(jnp.float64)
        desired = np.asarray(jax.jit(lambda p, v: _dense_hessian_times(model, loss, p, x64, y64, v))(p64, v64))
    rtol = 1e-10 if dtype == jnp.float64 else 2e-5
    np.testing.assert_allclose(ours, desired, rtol=rtol, atol=rtol * float(np.max(np.abs(desired))))


def test_dropout_in_training_keeps_its_mask():
    model = nn.Serial(nn.Dense(6), nn.Tanh(), nn.Dropout(0.5), nn.Dense(3))
    with jax.enable_x64(True):
        x, y = jax.random.normal(KEY, (4, 5), jnp.float64), jnp.array([0, 1, 2, 1])
        params, key = model.init(KEY, x), jax.random.PRNGKey(3)
        v = jax.tree_util.tree_map(jnp.ones_like, params)
        ours = curvature.hessian_vector_product(model, CE, train=True)(params, x, y, v, key=key)
        desired = _dense_hessian_times(model, CE, params, x, y, v, key=key, train=True)
        np.testing.assert_allclose(ravel_pytree(ours)[0], desired, rtol=1e-10, atol=1e-12)


@dataclasses.dataclass(frozen=True)
class _HalfTerm(nn.Dense):  # planted: forgets the input gradient through the weights' tangent
    def backward(self, res, d_y):
        return super().backward(res, d_y)

    def tangent(self, res, d_params, d_x):
        return super().tangent(res, d_params, d_x)

    def backward_tangent(self, res, d_params, d_x, d_y):
        second, d_x_second = super().backward_tangent(res, d_params, d_x, d_y)
        return second, None


def test_the_check_catches_a_missing_mixed_term():
    with jax.enable_x64(True):
        x, y = jax.random.normal(KEY, (3, 4), jnp.float64), jnp.array([0, 2, 1])
        good = nn.Serial(nn.Dense(5), nn.Tanh(), nn.Dense(3))
        params = good.init(KEY, x)
        assert fbp.check.curvature(good, CE, params, x, y).ok
        report = fbp.check.curvature(nn.Serial(nn.Dense(5), nn.Tanh(), _HalfTerm(3)), CE, params, x, y)
        failed = {r.path for r in report.failures}
        assert failed and all(p.startswith("hessian_vector_product:0/") for p in failed)  # below the planted layer


@pytest.mark.parametrize("train", [True, False], ids=["batch statistics", "running statistics"])
def test_batch_norm_in_both_modes(train):
    model = nn.Serial(nn.Dense(5), nn.BatchNorm(), nn.Tanh(), nn.Dense(3))
    with jax.enable_x64(True):
        x, y = jax.random.normal(KEY, (4, 6), jnp.float64), jnp.array([0, 2, 1, 1])
        params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.fold_in(KEY, a.size + 1),
                                                                               a.shape, a.dtype), model.init(KEY, x))
        state = jax.tree_util.tree_map(lambda a: a + 0.3, model.init_state(params))  # not the batch's statistics
        v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.fold_in(KEY, a.size), a.shape, a.dtype),
                                   params)
        ours = curvature.hessian_vector_product(model, CE, has_state=True, train=train)(params, state, x, y, v)
        desired = _dense_hessian_times(model, CE, params, x, y, v, state=state, train=train)
        np.testing.assert_allclose(ravel_pytree(ours)[0], desired, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first", [nn.MultiHeadAttention(2, causal=True), nn.TransformerBlock(2, 6, causal=True)],
                         ids=repr)
def test_attention_with_a_padding_mask_and_queries_that_see_no_key(first):
    """``(x, mask)`` inputs; left padding under the causal mask leaves the first queries no key."""
    with jax.enable_x64(True):
        model = nn.Serial(first, nn.Flatten(), nn.Dense(3))
        x = jax.random.normal(KEY, (2, 6, 4), jnp.float64)
        mask = jnp.array([[False, False, True, True, True, True], [True, True, True, True, False, False]])
        params = model.init(KEY, (x, mask))
        y = jnp.array([0, 2])
        v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.fold_in(KEY, a.size), a.shape, a.dtype),
                                   params)
        ours = ravel_pytree(jax.jit(curvature.hessian_vector_product(model, CE))(params, (x, mask), y, v))[0]
        desired = jax.jit(lambda p, v: _dense_hessian_times(model, CE, p, (x, mask), y, v))(params, v)
        np.testing.assert_allclose(ours, desired, rtol=1e-10, atol=1e-12 * float(np.max(np.abs(desired))))


def test_a_layer_without_a_rule_is_refused_by_name_and_path():
    model = nn.Serial(nn.Dense(4), nn.Residual(nn.Serial(nn.Dense(4), nn.MapCotangent(jnp.negative))), nn.Dense(2))
    with pytest.raises(fbp.InputError, match=r"MapCotangent.*at path '1/block/1'.*second-order term"):
        curvature.hessian_vector_product(model, CE)
    first = nn.Serial(nn.MapCotangent(jnp.negative), nn.LSTM(3), nn.LastStep(), nn.Dense(2))
    with pytest.raises(fbp.InputError, match=r"MapCotangent.*at path '0'"):
        curvature.hessian_vector_product(first, CE)


@pytest.mark.parametrize("layer", [nn.SimpleRNN(3), nn.LSTM(3), nn.GRU(3)], ids=repr)
def test_recurrent_terms_with_an_initial_state_equal_the_derivative_of_the_backward(layer):
    """``backward_tangent`` against ``jax.jvp`` of the layer's own backward, its residuals moving
    with ``(params, x, h0)``: every output, the initial state's term included (float64)."""
    with jax.enable_x64(True):
        x = jax.random.normal(KEY, (2, 4, 5), jnp.float64)
        carry = jax.random.normal(jax.random.PRNGKey(7), (2, 3), jnp.float64)
        carry = (carry, 0.5 * carry) if isinstance(layer, nn.LSTM) else carry
        params = layer.init(KEY, (x, carry))
        d_y = jax.random.normal(jax.random.PRNGKey(8), (2, 4, 3), jnp.float64)
        tangents = [jax.tree_util.tree_map(lambda a, i=i: jax.random.normal(jax.random.fold_in(KEY, i + a.size),
                                                                            a.shape, a.dtype), t)
                    for i, t in enumerate((params, x, carry))]
        backward = lambda p, a, c: layer.backward(fbp.core.run_forward(layer, p, (a, c))[1], d_y)  # noqa: E731
        desired = jax.jvp(backward, (params, x, carry), tuple(tangents))[1]
        res = fbp.core.run_forward(layer, params, (x, carry))[1]
        ours = layer.backward_tangent(res, tangents[0], (tangents[1], tangents[2]), d_y)
        for got, want in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(desired), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * float(np.max(np.abs(want))))
