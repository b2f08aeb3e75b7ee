"""Dropout: rule vs jax.grad, keep rate, inverted scaling, fresh keys, identity in evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import losses, nn


@pytest.mark.every_mode  # all four precision × jit combinations (conftest)
def test_matches_jax(dtype, jit):
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5), dtype)
    fbp.check.assert_layer(nn.Dropout(0.4), {}, x, key=jax.random.PRNGKey(1), train=True, dtype=dtype, jit=jit)


def test_keep_rate_and_rescaling():
    x = jnp.ones((200, 500))
    y = nn.Dropout(0.3).apply({}, x, key=jax.random.PRNGKey(0), train=True)
    kept = y != 0
    assert abs(float(kept.mean()) - 0.7) < 0.005  # rate = probability of dropping
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert abs(float(y.mean()) - 1.0) < 0.01


def test_identity_in_evaluation_and_key_required_in_training():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    np.testing.assert_array_equal(nn.Dropout(0.5).apply({}, x), x)
    with pytest.raises(fbp.InputError, match="training mode needs a random key"):
        nn.Dropout(0.5).apply({}, x, train=True)
    with pytest.raises(ValueError, match="rate"):
        nn.Dropout(1.0)


def test_no_mask_reused_across_layers_or_steps():
    model = nn.Serial(nn.Dropout(0.5), nn.Dropout(0.5))
    x = jnp.ones((1, 1000))
    _, res = model.forward(model.init(jax.random.PRNGKey(0), x), x, key=jax.random.PRNGKey(1), train=True)
    assert not np.array_equal(res[0], res[1])  # keys split per layer
    from fbp import optim, train
    m = nn.Serial(nn.Dense(8), nn.Dropout(0.5), nn.Dense(2))
    xs = jax.random.normal(jax.random.PRNGKey(2), (64, 3))
    ys = jax.random.randint(jax.random.PRNGKey(3), (64,), 0, 2)
    p = m.init(jax.random.PRNGKey(4), xs)
    a = train.fit(m, losses.CategoricalCrossEntropy(from_logits=True), optim.sgd(0.1), p, xs, ys,
                  key=jax.random.PRNGKey(5), epochs=2, batch_size=16, progress=False)
    b = train.fit(m, losses.CategoricalCrossEntropy(from_logits=True), optim.sgd(0.1), p, xs, ys,
                  key=jax.random.PRNGKey(5), epochs=2, batch_size=16, progress=False, scan_epochs=True)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)  # same keys either way
    # per-step keys differ: the step key is fold_in(epoch key, step)
    epoch_key = jax.random.PRNGKey(0)
    masks = {tuple(np.asarray(jax.random.bernoulli(jax.random.fold_in(epoch_key, i), 0.5, (16,))).tolist())
             for i in range(4)}
    assert len(masks) == 4
