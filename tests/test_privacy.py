"""DP-SGD: clipped sums against vmap(grad) references, noise statistics, accounting, errors."""

import math

import dp_accounting as dp
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import accounting, losses, nn, optim, privacy, train

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MODELS = {
    "mlp": (nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3)), (6, 5)),
    "cnn": (nn.Serial(nn.Conv2D(4, 3), nn.ReLU(), nn.LayerNorm(), nn.Flatten(), nn.Dense(3)), (5, 6, 6, 2)),
    "cnn-wide": (nn.Serial(nn.Conv2D(4, 3, strides=2), nn.ReLU(), nn.Flatten(), nn.Dense(3)), (5, 6, 6, 8)),  # looped
    "rnn": (nn.Serial(nn.Dense(6), nn.LSTM(5), nn.LastStep(), nn.Dense(3)), (4, 7, 3)),
    "tokens": (nn.Serial(nn.Embedding(9, 6), nn.LearnedPositionalEmbedding(5), nn.TransformerBlock(2, 12),
                         nn.GRU(5), nn.LastStep(), nn.Dense(3)), (4, 5)),
}


def _per_example(model, params, x, y):
    return jax.jit(jax.vmap(lambda xb, yb: jax.grad(lambda p: CCE(model.apply(p, xb[None]), yb[None]))(params)))(x, y)


@pytest.mark.parametrize("name", list(MODELS))
def test_clipped_sum_is_the_sum_of_clipped_per_example_gradients(name):
    with jax.enable_x64(True):
        model, shape = MODELS[name]
        x = jax.random.randint(jax.random.PRNGKey(0), shape, 0, 9) if name == "tokens" else \
            jax.random.normal(jax.random.PRNGKey(0), shape)
        y = jnp.arange(shape[0]) % 3
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
        per = _per_example(model, params, x, y)
        norms = jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1) for a in jax.tree_util.tree_leaves(per)))
        clip = float(jnp.median(norms))
        mask = jnp.arange(shape[0]) != 1  # a padded row of a Poisson batch counts for nothing
        weights = jnp.minimum(1, clip / norms) * mask
        expected = jax.tree_util.tree_map(lambda g: jnp.tensordot(weights, g, 1), per)
        values, grads, got_norms = jax.jit(privacy.clipped_grad(model, CCE, clip))(params, x, y, mask=mask)
        np.testing.assert_allclose(got_norms, norms, rtol=1e-10)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        if name != "mlp":  # the rest is the same for every family: the clipped sum's weights are tested above
            return
        # no clipping and no noise: the plain gradient of the summed loss
        _, unclipped, _ = jax.jit(privacy.clipped_grad(model, CCE, math.inf))(params, x, y)
        _, plain = jax.jit(fbp.value_and_grad(model, CCE))(params, x, y)
        for a, b in zip(jax.tree_util.tree_leaves(unclipped), jax.tree_util.tree_leaves(plain)):
            np.testing.assert_allclose(a, shape[0] * b, rtol=1e-10, atol=1e-12)
        _, noiseless, _ = jax.jit(privacy.private_grad(model, CCE, 1e6, 0.0, shape[0]))(
            params, x, y, noise_key=jax.random.PRNGKey(0))
        for a, b in zip(jax.tree_util.tree_leaves(noiseless), jax.tree_util.tree_leaves(plain)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_noise_is_reproducible_and_has_the_stated_statistics():
    model = nn.Serial(nn.Dense(200), nn.Tanh(), nn.Dense(64))
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 64))
    y = jnp.arange(16) % 64
    params = model.init(jax.random.PRNGKey(1), x)
    clip, sigma, size = 0.5, 1.3, 16.0
    f = jax.jit(privacy.private_grad(model, CCE, clip, sigma, size))
    _, a, _ = f(params, x, y, noise_key=jax.random.PRNGKey(7))
    _, b, _ = f(params, x, y, noise_key=jax.random.PRNGKey(7))
    _, c, _ = f(params, x, y, noise_key=jax.random.PRNGKey(8))
    _, clean, _ = privacy.clipped_grad(model, CCE, clip)(params, x, y)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert not np.allclose(a[0]["w"], c[0]["w"])
    z = np.concatenate([np.ravel((u * size - v) / (sigma * clip)) for u, v in
                        zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(clean))])
    assert z.size > 25000 and abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


def test_epsilon_equals_dp_accounting_and_calibration_round_trips():
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(0.01, dp.GaussianDpEvent(1.1)), 1000)
    for name, acc in (("rdp", dp.rdp.RdpAccountant()), ("pld", dp.pld.PLDAccountant())):
        acc.compose(event)
        assert accounting.epsilon(1.1, 0.01, 1000, 1e-5, accountant=name) == pytest.approx(acc.get_epsilon(1e-5))
    sigma = accounting.calibrate_noise(2.0, 1e-5, 0.01, 1000)
    assert accounting.epsilon(sigma, 0.01, 1000, 1e-5) == pytest.approx(2.0, rel=1e-3)
    assert accounting.epsilon(0.0, 0.01, 10, 1e-5) == math.inf


def test_poisson_batches_and_fit_with_privacy():
    idx, mask = privacy.poisson_batch(jax.random.PRNGKey(0), 1000, 0.05, privacy.max_batch(1000, 50))
    counts = jax.vmap(lambda k: privacy.poisson_batch(k, 1000, 0.05, 100)[1].sum())(
        jax.random.split(jax.random.PRNGKey(1), 400))
    assert abs(float(counts.mean()) - 50) < 1.5 and bool(jnp.all(idx[:int(mask.sum())] < 1000))
    assert bool(jnp.all(mask[:int(mask.sum())])) and not bool(jnp.any(mask[int(mask.sum()):]))
    x = jax.random.normal(jax.random.PRNGKey(0), (200, 5))
    y = (x[:, 0] > 0).astype(jnp.int32)
    model = nn.Serial(nn.Dense(16), nn.ReLU(), nn.Dense(2))
    params = model.init(jax.random.PRNGKey(1), x)
    for sampling in ("poisson", "fixed"):
        spec = privacy.DPSGD(l2_clip=1.0, noise_multiplier=0.8, sampling=sampling)
        result = train.fit(model, CCE, optim.adam(1e-2), params, x, y, key=jax.random.PRNGKey(2), epochs=4,
                           batch_size=20, progress=False, privacy=spec, scan_epochs=sampling == "poisson")
        eps = result.history["epsilon"]
        assert eps.shape == (4,) and np.all(np.diff(eps) > 0)
        assert eps[-1] == pytest.approx(spec.epsilon(200, 20, 40))
        assert result.history["accuracy"][-1] > 0.7


def test_bad_input():
    with pytest.raises(ValueError, match="l2_clip"):
        privacy.DPSGD(l2_clip=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        privacy.DPSGD(l2_clip=1.0, noise_multiplier=-0.1)
    with pytest.raises(ValueError, match="delta"):
        privacy.DPSGD(l2_clip=1.0, noise_multiplier=1.0, delta=1.0)
    with pytest.raises(ValueError, match="l2_clip"):
        privacy.clipped_grad(nn.Dense(2), CCE, -1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        accounting.epsilon(1.0, 1.5, 10, 1e-5)
    x, y = jnp.ones((10, 3)), jnp.zeros(10, jnp.int32)
    model = nn.Serial(nn.Dense(2))
    with pytest.raises(ValueError, match="expected batch_size"):
        train.fit(model, CCE, optim.sgd(0.1), model.init(jax.random.PRNGKey(0), x), x, y, key=jax.random.PRNGKey(0),
                  batch_size=None, privacy=privacy.DPSGD(1.0, 1.0), progress=False)
    with pytest.raises(TypeError, match="DPSGD"):
        train.fit(model, CCE, optim.sgd(0.1), model.init(jax.random.PRNGKey(0), x), x, y, key=jax.random.PRNGKey(0),
                  privacy={"l2_clip": 1.0}, progress=False)


def test_a_mask_that_weighs_or_has_the_wrong_length_is_refused():
    """A mask selects examples: 2.0 would double one example's contribution (and break the
    sensitivity bound), -1 would flip it; only bool or exactly 0/1 of the batch's length pass."""
    from fbp.core import InputError

    model = nn.Serial(nn.Dense(4), nn.Tanh(), nn.Dense(3))
    x, y = jax.random.normal(jax.random.PRNGKey(0), (4, 5)), jnp.arange(4) % 3
    params = model.init(jax.random.PRNGKey(1), x)
    clip = privacy.clipped_grad(model, CCE, 1.0)
    for bad in (jnp.array([1.0, 2.0, 1.0, 0.0]), jnp.array([1, -1, 1, 1]), jnp.array([0.5, 1, 1, 1])):
        with pytest.raises(InputError, match="mask must hold only 0 and 1"):
            clip(params, x, y, mask=bad)
    with pytest.raises(InputError, match=r"one entry per example, shape \(4,\); got \(3,\) bool"):
        clip(params, x, y, mask=jnp.ones(3, bool))
    with pytest.raises(InputError, match="mask must be bool under jit"):
        jax.jit(clip)(params, x, y, mask=jnp.ones(4))
    as_ints = clip(params, x, y, mask=jnp.array([1, 0, 1, 1]))[1]
    as_bools = jax.jit(clip)(params, x, y, mask=jnp.array([True, False, True, True]))[1]
    for u, v in zip(jax.tree_util.tree_leaves(as_ints), jax.tree_util.tree_leaves(as_bools), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_every_accountant_name_changes_the_computation_and_refusals_are_clear():
    from fbp import accounting

    rdp = accounting.epsilon(1.0, 0.01, 1000, 1e-5)
    pld = accounting.epsilon(1.0, 0.01, 1000, 1e-5, accountant="pld")
    assert pld < rdp and abs(pld - rdp) > 0.05  # PLD is tighter: a different computation
    with pytest.raises(ValueError, match="accounted by 'rdp' only"):
        accounting.epsilon(1.0, 0.01, 1000, 1e-5, accountant="pld", dataset_size=1000)
    assert accounting.epsilon(1.0, 0.01, 0, 1e-5) == 0.0 and accounting.calibrate_noise(1.0, 1e-5, 0.01, 0) == 0.0
    for size in (0, -5, 2.5):
        with pytest.raises((TypeError, ValueError), match="dataset_size must be an int"):
            accounting.epsilon(1.0, 0.01, 10, 1e-5, dataset_size=size)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        accounting.epsilon(1.0, 0.01, -1, 1e-5)


def test_dp_accounting_warnings_do_not_reach_the_user():
    import subprocess
    import sys

    code = ("from fbp import accounting; print(accounting.epsilon(0.3, 0.1, 100, 1e-5)); "
            "print(accounting.calibrate_noise(1.0, 1e-5, 0.1, 100))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "absl" not in out.stderr and "converge" not in out.stderr, out.stderr[:500]
