"""Attention and the transformer block vs jax.grad; masks; causality leaks nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import nn

MASK = jnp.array([[True] * 6, [True, True, True, True, False, False]])
LAYERS = [nn.MultiHeadAttention(2), nn.MultiHeadAttention(4, causal=True), nn.TransformerBlock(2, 16),
          nn.TransformerBlock(4, 12, causal=True)]


def _perturbed(params):
    return jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(3), a.shape, a.dtype),
                                  params)


@pytest.mark.parametrize("layer", LAYERS, ids=repr)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_jax(layer, masked, dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8), dtype)
    inputs = (x, MASK) if masked else x
    fbp.check.assert_layer(layer, _perturbed(layer.init(jax.random.PRNGKey(1), inputs)), inputs, dtype=dtype, jit=jit)


@pytest.mark.parametrize("layer", [nn.MultiHeadAttention(2, causal=True), nn.TransformerBlock(2, 8, causal=True)],
                         ids=repr)
@pytest.mark.parametrize("length", [1, 5])
def test_lengths_including_one(layer, length):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, length, 4))
    fbp.check.assert_layer(layer, layer.init(jax.random.PRNGKey(1), x), x)


@pytest.mark.parametrize("layer", [nn.MultiHeadAttention(2, causal=True), nn.TransformerBlock(2, 8, causal=True)],
                         ids=repr)
def test_a_query_that_may_see_no_key(layer, monkeypatch):
    """Left padding under a causal mask: the first two queries may see no key. Their weights are
    uniform over the masked keys and no score moves (the backward, the tangent and the
    second-order term); without the masking of those scores the check fails."""
    mask = jnp.array([[False, False, True, True, True, True], [True] * 6])
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4))
    params = _perturbed(layer.init(jax.random.PRNGKey(1), (x, mask)))
    fbp.check.assert_layer(layer, params, (x, mask))
    monkeypatch.setattr(fbp.nn.attention, "_where_allowed", lambda allowed, a: a)
    with pytest.raises(AssertionError):
        fbp.check.assert_layer(layer, params, (x, mask))


@pytest.mark.parametrize("layer", [nn.MultiHeadAttention(2, causal=True), nn.TransformerBlock(2, 8, causal=True)],
                         ids=repr)
def test_causal_attention_leaks_nothing(layer):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 4))
    params = layer.init(jax.random.PRNGKey(1), x)
    y, pullback = fbp.vjp(layer, params, x)
    for t in range(7):
        d_y = jnp.zeros_like(y).at[:, t].set(jax.random.normal(jax.random.PRNGKey(t), y[:, t].shape))
        _, d_x = pullback(d_y)
        assert bool((d_x[:, t + 1:] == 0).all()), f"output {t} depends on later inputs"
        assert bool((d_x[:, : t + 1] != 0).any())


def test_padding_mask_hides_padded_keys():
    layer = nn.MultiHeadAttention(2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8))
    params = layer.init(jax.random.PRNGKey(1), (x, MASK))
    y, pullback = fbp.vjp(layer, params, (x, MASK))
    # the real tokens' outputs do not depend on the padded tokens at all
    d_y = jnp.zeros_like(y).at[1, :4].set(1.0)
    (d_x, d_mask) = pullback(d_y)[1]
    assert d_mask is None
    np.testing.assert_array_equal(d_x[1, 4:], 0.0)
    changed = x.at[1, 4:].set(100.0)
    np.testing.assert_allclose(layer.apply(params, (changed, MASK))[1, :4], y[1, :4], rtol=1e-5, atol=1e-6)


def test_positional_embeddings():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6))
    learned = nn.LearnedPositionalEmbedding(8)
    fbp.check.assert_layer(learned, learned.init(jax.random.PRNGKey(1), x), x)
    fbp.check.assert_layer(nn.SinusoidalPositionalEmbedding(), {}, x)
    table = nn.positional.sinusoidal_table(4, 6)
    np.testing.assert_allclose(table[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
    np.testing.assert_allclose(table[1, 0], np.sin(1.0), rtol=1e-6)
    with pytest.raises(fbp.InputError, match="time <= 8"):
        learned.apply(learned.init(jax.random.PRNGKey(1), x), jnp.ones((1, 9, 6)))


def test_errors():
    with pytest.raises(fbp.InputError, match="model_dim 6 must be divisible by num_heads 4"):
        nn.MultiHeadAttention(4).init(jax.random.PRNGKey(0), jnp.ones((1, 3, 6)))
    with pytest.raises(fbp.InputError, match=r"padding mask must be \(batch, time\) = \(1, 3\)"):
        nn.MultiHeadAttention(2).init(jax.random.PRNGKey(0), (jnp.ones((1, 3, 4)), jnp.ones((1, 4), bool)))
