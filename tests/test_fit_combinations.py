"""Every pair of fit's features: telemetry, privacy, precision, a mesh, K-FAC, checkpoints.

Each pair that makes sense trains (finite loss, each feature's mark in the result); each that
cannot is refused before training with its reason. The numbers of each combination are
checked where they are built: DP-SGD and K-FAC on 4 devices against one in
``tests/test_parallel.py``, telemetry of the clipped pass and K-FAC's resumed run below.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import kfac, losses, nn, optim, parallel, privacy, telemetry, train
from fbp.kfac import KFACState

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MODEL = nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(4))
X = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (64, 8)), np.float32)
Y = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (64,), 0, 4))
PARAMS = MODEL.init(jax.random.PRNGKey(2), X[:1])
FEATURES = ("telemetry", "privacy", "precision", "mesh", "kfac", "checkpoint")
REFUSED = {frozenset({"privacy", "precision"}): "low-precision compute dtype the per-example norms",
           frozenset({"privacy", "kfac"}): "unclipped, un-noised gradients",
           frozenset({"precision", "kfac"}): "eigendecompositions need float32"}


def _arguments(features, tmp_path):
    kw = {"key": jax.random.PRNGKey(3), "epochs": 2, "batch_size": 16, "progress": False}
    optimizer = kfac.kfac(MODEL, CCE, optim.sgd(0.05)) if "kfac" in features else optim.sgd(0.1)
    if "telemetry" in features:
        kw["telemetry"] = ["d_params_norm", "out_mean"]
    if "privacy" in features:
        kw["privacy"] = privacy.DPSGD(l2_clip=1.0, noise_multiplier=1.0)
    if "precision" in features:
        kw["precision"] = "bfloat16"
    if "mesh" in features:
        kw["mesh"] = parallel.data_mesh(1)
    if "checkpoint" in features:
        kw["checkpoint_dir"] = str(tmp_path / "run")
    return optimizer, kw


@pytest.mark.parametrize("pair", list(itertools.combinations(FEATURES, 2)), ids="+".join)
def test_every_pair_trains_or_is_refused_with_its_reason(pair, tmp_path):
    optimizer, kw = _arguments(pair, tmp_path)
    reason = REFUSED.get(frozenset(pair))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # telemetry under DP-SGD says its statistics are not private
        if reason is not None:
            with pytest.raises(ValueError, match=reason):
                train.fit(MODEL, CCE, optimizer, PARAMS, X, Y, **kw)
            return
        result = train.fit(MODEL, CCE, optimizer, PARAMS, X, Y, **kw)
    assert result.epochs_run == 2 and np.all(np.isfinite(result.history["loss"])), result.stop_reason
    if "telemetry" in pair:
        assert set(result.telemetry["0"]) == {"d_params_norm", "out_mean"}
        assert np.all(np.isfinite(result.telemetry["0"]["d_params_norm"]))
    if "privacy" in pair:
        assert result.history["epsilon"][-1] > 0
    if "kfac" in pair:
        assert isinstance(result.opt_state, KFACState) and int(result.opt_state.count) == 8
    if "checkpoint" in pair:
        assert (tmp_path / "run").is_dir() and any((tmp_path / "run").iterdir())


def test_the_refusals_are_the_only_ones():
    assert set(REFUSED) <= {frozenset(p) for p in itertools.combinations(FEATURES, 2)}


def test_kfac_in_fit_resumes_bit_exactly(tmp_path):
    optimizer = kfac.kfac(MODEL, CCE, optim.sgd(0.05, momentum=0.9), curvature_every=2, inverse_every=3)
    kw = {"key": jax.random.PRNGKey(3), "batch_size": 16, "progress": False, "telemetry": ["d_params_norm"]}
    whole = train.fit(MODEL, CCE, optimizer, PARAMS, X, Y, epochs=4, **kw)
    train.fit(MODEL, CCE, optimizer, PARAMS, X, Y, epochs=2, checkpoint_dir=str(tmp_path), **kw)
    resumed = train.fit(MODEL, CCE, optimizer, PARAMS, X, Y, epochs=4, checkpoint_dir=str(tmp_path), resume=True,
                        **kw)
    for a, b in zip(jax.tree_util.tree_leaves((whole.params, whole.opt_state)),
                    jax.tree_util.tree_leaves((resumed.params, resumed.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(whole.history["loss"], resumed.history["loss"])
    np.testing.assert_array_equal(whole.telemetry["0"]["d_params_norm"], resumed.telemetry["0"]["d_params_norm"])


def test_kfac_in_fit_equals_its_own_step_and_chains_with_clipping():
    """The transformation in make_step is KFAC.step (same factors, same update); chained after
    clipping it preconditions the clipped gradient."""
    k = kfac.kfac(MODEL, CCE, optim.sgd(0.05, momentum=0.9), mc_samples=None)
    tx = k.transformation(X[:1], Y[:1])
    step = train.make_step(MODEL, CCE, tx)
    own = jax.jit(k.step)
    p1, s1, p2, s2 = PARAMS, k.init(PARAMS, X[:16], Y[:16]), PARAMS, tx.init(PARAMS)
    for i in range(3):
        xb, yb = X[16 * i:16 * i + 16], Y[16 * i:16 * i + 16]
        p1, s1, _ = own(p1, s1, xb, yb)
        p2, s2, _ = step(p2, s2, xb, yb)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    clipped = optim.chain(optim.clip_by_global_norm(1e-3), tx)
    assert clipped.extensions == tx.extensions
    p3, s3, _ = train.make_step(MODEL, CCE, clipped)(PARAMS, clipped.init(PARAMS), X[:16], Y[:16])
    moved = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree_util.tree_leaves(p3),
                                                                     jax.tree_util.tree_leaves(PARAMS), strict=True)))
    assert 0 < moved <= 0.05 * 1e-3 / 0.1 * 1.01  # ‖(F + λ)⁻¹ g‖ ≤ ‖g‖/λ with ‖g‖ ≤ 1e-3


def test_telemetry_of_a_private_step_reads_the_clipped_pass():
    """The instrumented pass of Σ_b c_b ℓ_b: its gradient is the one-pass clipped sum, its
    d_params_norm that sum's norm, its output statistics those of the drawn rows only."""
    from fbp.privacy import _clipped, _clipped_pass

    with jax.enable_x64(True):
        x = jnp.asarray(X[:12], jnp.float64)
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), PARAMS)
        mask = jnp.arange(12) < 9
        probed = telemetry.Instrumented.of(MODEL, None)
        values, grads, _, stats = _clipped_pass(probed, MODEL, CCE, 0.3, params, x, Y[:12], mask)
        _, ref, _ = _clipped(MODEL, CCE, 0.3, params, x, Y[:12], mask=mask)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(ref[0])))
        np.testing.assert_allclose(stats["0"]["d_params_norm"], norm, rtol=1e-12)
        hidden = MODEL.layers[0].apply(params[0], x[:9])
        np.testing.assert_allclose(stats["0"]["out_mean"], jnp.mean(hidden), rtol=1e-12)
        np.testing.assert_allclose(stats["0"]["out_std"], jnp.std(hidden), rtol=1e-10)


def test_telemetry_under_precision_reads_the_low_precision_pass():
    f32 = telemetry.Instrumented.of(MODEL, None).run(CCE, PARAMS, jnp.asarray(X[:16]), Y[:16])
    from fbp.precision import Policy

    bf16 = telemetry.Instrumented.of(MODEL, None).run(CCE, PARAMS, jnp.asarray(X[:16]), Y[:16],
                                                     policy=Policy.parse("bfloat16"))
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(bf16[1]))  # grads in the params' dtype
    assert bf16[2].dtype == jnp.float32  # the output policy's dtype
    for name in ("d_params_norm", "out_std"):
        a, b = float(f32[4]["0"][name]), float(bf16[4]["0"][name])
        assert a != b and abs(a - b) <= 0.02 * abs(a), name  # the bfloat16 pass, close to the float32 one
