"""fbp.curvature and the losses' Hessian factors against JAX autodiff of the plain forward
(dense Jacobians and Hessians: fbp.check.curvature), for every layer family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import curvature, losses, nn

CE = losses.CategoricalCrossEntropy(from_logits=True)

# (name, model, input shape, loss, kind of target); small enough for dense references
FAMILIES = [
    ("dense", nn.Serial(nn.Dense(4), nn.Tanh(), nn.Dense(3)), (3, 5), CE, "labels"),
    ("dense-sequence", nn.Serial(nn.Dense(4), nn.GELU(), nn.Dense(2)), (2, 3, 4), losses.MSE(), "real"),
    # the 3x3 convolution on 8 channels has windows wider than 64: looped (fbp.nn.conv_ops.ConvWindows)
    ("conv-pool", nn.Serial(nn.Conv2D(8, (3, 3)), nn.Sigmoid(), nn.MaxPool2D((2, 2)), nn.Conv2D(3, (3, 3)),
                            nn.Conv2D(2, (1, 1)), nn.AvgPool2D((2, 2)), nn.Flatten(), nn.Dense(3)), (2, 6, 6, 2), CE,
     "labels"),
    ("conv1d", nn.Serial(nn.Conv1D(3, 3, strides=2), nn.Softplus(), nn.Flatten(), nn.Dense(1)), (2, 7, 2),
     losses.BinaryCrossEntropy(from_logits=True), "binary"),
    ("layernorm", nn.Serial(nn.Dense(4), nn.LayerNorm(), nn.Dense(3)), (3, 5), losses.MSE(reduction="sum"), "real"),
    ("groupnorm", nn.Serial(nn.Conv2D(4, (2, 2)), nn.GroupNorm(2), nn.Flatten(), nn.Dense(2)), (2, 4, 4, 2), CE,
     "labels"),
    ("simple-rnn", nn.Serial(nn.SimpleRNN(3), nn.LastStep(), nn.Dense(2)), (2, 4, 3), CE, "labels"),
    ("lstm", nn.Serial(nn.LSTM(3), nn.Dense(2)), (2, 4, 3), CE, "labels"),
    ("gru", nn.Serial(nn.GRU(3), nn.Dense(2)), (2, 4, 3), losses.Huber(delta=0.5), "real"),
    ("attention", nn.Serial(nn.MultiHeadAttention(2, causal=True), nn.Dense(3)), (2, 4, 4), CE, "labels"),
    ("transformer", nn.Serial(nn.TransformerBlock(2, 8), nn.Dense(2)), (2, 3, 4), CE, "labels"),
    ("residual", nn.Serial(nn.Residual(nn.Serial(nn.Dense(4), nn.Tanh())), nn.Dense(2)), (3, 4), losses.MSE(),
     "real"),
]


def _problem(model, shape, loss, kind, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape))
    params = model.init(jax.random.key(seed), x)
    pred_shape = jax.eval_shape(model.apply, params, x).shape
    y = {"labels": lambda: jnp.asarray(rng.integers(0, pred_shape[-1], pred_shape[:-1])),
         "binary": lambda: jnp.asarray(rng.integers(0, 2, pred_shape).astype(np.float64)),
         "real": lambda: jnp.asarray(rng.standard_normal(pred_shape))}[kind]()
    return params, x, y


@pytest.mark.parametrize("name, model, shape, loss, kind", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_matches_jax_autodiff_in_float64(name, model, shape, loss, kind):
    with jax.enable_x64(True):
        params, x, y = _problem(model, shape, loss, kind)
        report = fbp.check.curvature(model, loss, params, x, y, jit=name != "dense")  # one family eagerly
    print(report)
    report.assert_ok()
    assert any(r.path.startswith("diag_ggn:") for r in report.rows)
    chain_only = name in ("dense", "dense-sequence", "conv-pool", "conv1d")
    assert any(r.path.startswith("diag_hessian:") for r in report.rows) == chain_only
    assert any(r.path.startswith("hessian_vector_product:") for r in report.rows)  # every family has its rules


@pytest.mark.parametrize("index", [0, 2, 7])
def test_float32_under_jit(index):
    name, model, shape, loss, kind = FAMILIES[index]
    params, x, y = _problem(model, shape, loss, kind)
    report = fbp.check.curvature(model, loss, params, x, y, dtype=jnp.float32, jit=True, rtol=2e-5)
    assert report.ok, str(report)


def test_the_check_catches_a_wrong_factor_and_a_wrong_second_derivative():
    class Inflated(losses.CategoricalCrossEntropy):  # a Hessian factor 1 % too large
        def hessian_factor(self, pred, target):
            return 1.01 * super().hessian_factor(pred, target)

    class BadTanh(nn.Tanh):  # f'' with the wrong sign
        def second_derivative(self, y):
            return 2 * y * (1 - y * y)

    with jax.enable_x64(True):
        model = FAMILIES[0][1]
        params, x, y = _problem(model, (3, 5), CE, "labels")
        wrong = fbp.check.curvature(model, Inflated(from_logits=True), params, x, y)
        assert not wrong.ok and all(not r.ok for r in wrong.rows if r.path.startswith("diag_ggn"))
        bad = nn.Serial(nn.Dense(4), BadTanh(), nn.Dense(3))
        report = fbp.check.curvature(bad, CE, params, x, y)
        failed = {r.path for r in report.failures}
        assert {p.split(":")[0] for p in failed} == {"diag_hessian", "hessian_vector_product"}
        assert all(p.split(":")[1].startswith("0/") for p in failed)  # below the activation only


# --------------------------------------------------------------------------- the losses' factors
LOSSES = [losses.MSE(), losses.MSE(reduction="sum"), losses.MAE(), losses.Huber(delta=0.7),
          losses.BinaryCrossEntropy(from_logits=True), losses.BinaryCrossEntropy(reduction="none"),
          losses.Hinge(), CE, losses.CategoricalCrossEntropy(reduction="sum"),
          losses.CategoricalCrossEntropy(from_logits=True, reduction="none"), losses.MulticlassHinge()]


def _loss_problem(loss, shape, rng):
    pred = rng.standard_normal(shape)
    if isinstance(loss, losses.Hinge):
        return jnp.asarray(pred), jnp.asarray(np.sign(rng.standard_normal(shape)))
    if isinstance(loss, losses.MulticlassHinge):
        return jnp.asarray(pred), jnp.asarray(rng.integers(0, shape[-1], shape[:-1]))
    if getattr(loss, "class_axis", False):
        if not loss.from_logits:
            pred = np.exp(pred) / np.exp(pred).sum(-1, keepdims=True)
        soft = rng.random(shape)
        return jnp.asarray(pred), jnp.asarray(soft / soft.sum(-1, keepdims=True) * 1.3)  # soft, Σt ≠ 1
    if isinstance(loss, losses.BinaryCrossEntropy):
        pred = pred if loss.from_logits else 1 / (1 + np.exp(-pred))
        return jnp.asarray(pred), jnp.asarray(rng.random(shape))
    return jnp.asarray(pred), jnp.asarray(rng.standard_normal(shape))


@pytest.mark.parametrize("loss", LOSSES, ids=repr)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_hessian_factor_equals_jax_hessian(loss, shape):
    with jax.enable_x64(True):
        pred, t = _loss_problem(loss, shape, np.random.default_rng(1))
        total = (lambda z: loss(z, t).sum()) if loss.reduction == "none" else (lambda z: loss(z, t))
        h = jax.jit(jax.hessian(total))(pred).reshape(pred.size, pred.size)
        s = jax.jit(loss.hessian_factor)(pred, t)
        assert s.shape[:-1] == pred.shape
        # a block per example: S_n S_nᵀ, zero between examples
        s_rows = s.reshape(shape[0], -1, s.shape[-1])
        blocks = jnp.einsum("nim,njm->nij", s_rows, s_rows)
        k = s_rows.shape[1]
        expected = jax.scipy.linalg.block_diag(*blocks)
        assert float(jnp.max(jnp.abs(expected - h))) <= 1e-12 * max(1.0, float(jnp.max(jnp.abs(h)))), (k, loss)


@pytest.mark.parametrize("loss", [losses.MSE(), losses.BinaryCrossEntropy(from_logits=True), CE,
                                  losses.BinaryCrossEntropy(), losses.Huber()], ids=repr)
def test_sampled_factor_is_unbiased(loss):
    """``E[S Sᵀ] = H``: with 40 000 columns the mean of ``s sᵀ`` is within 5 standard errors
    (each entry's spread measured from the samples themselves) of the exact block."""
    with jax.enable_x64(True):
        pred, t = _loss_problem(loss, (2, 3), np.random.default_rng(2))
        samples = 40_000
        s = loss.sampled_hessian_factor(pred, t, jax.random.key(3), samples) * np.sqrt(samples)
        outer = jnp.einsum("nim,njm->mnij", s, s)  # per-sample estimates of H_n
        exact = jnp.einsum("nim,njm->nij", *(2 * [loss.hessian_factor(pred, t)]))
        mean, se = outer.mean(0), outer.std(0) / np.sqrt(samples)
        assert float(jnp.max(jnp.abs(mean - exact) - 5 * se - 1e-12)) <= 0


# --------------------------------------------------------------------------- Monte-Carlo GGN diagonal
def test_monte_carlo_diagonal_converges_to_the_exact_one():
    """The relative error of ``diag_ggn_mc`` falls like ``1/√samples``: at 16× the samples it is
    below 0.4× (the 1/4 expected, with slack for one seed), and under 5 % at 4 096 samples."""
    with jax.enable_x64(True):
        name, model, shape, loss, kind = FAMILIES[0]
        params, x, y = _problem(model, shape, loss, kind)
        exact = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(curvature.diag_ggn(model, loss)(
            params, x, y))])

        def error(samples):
            mc = curvature.diag_ggn_mc(model, loss, samples)(params, x, y, key=jax.random.key(samples))
            flat = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(mc)])
            return float(jnp.linalg.norm(flat - exact) / jnp.linalg.norm(exact))

        small, large = error(256), error(4096)
        assert large < 0.4 * small and large < 0.05, (small, large)


# --------------------------------------------------------------------------- K-FAC factors
def _kron_ggn_block(model, loss, params, x, y, keys):
    """The exact GGN block of the stacked matrix [w rows; b] of a leaf, by JAX autodiff."""
    flat_w = [params[k].reshape(-1) for k in keys]
    sizes = [a.size for a in flat_w]

    def apply(f):
        p, start = dict(params), 0
        for k, n in zip(keys, sizes):
            p[k] = f[start:start + n].reshape(params[k].shape)
            start += n
        return model.apply(p, x)

    flat = jnp.concatenate(flat_w)
    pred = apply(flat)
    jac = jax.jit(jax.jacrev(apply))(flat).reshape(pred.size, flat.size)
    hess = jax.jit(jax.hessian(lambda z: loss(z, y)))(pred).reshape(pred.size, pred.size)
    return jac.T @ hess @ jac


@pytest.mark.parametrize("model, shape, keys", [
    (nn.Dense(3), (1, 4), ("w", "b")),
    (nn.Conv2D(2, (3, 3), padding="VALID"), (1, 3, 3, 2), ("w", "b")),  # one output pixel: one position
    (nn.LSTM(2), (1, 1, 3), ("w_x", "w_h", "b")),  # one step
], ids=["dense", "conv", "lstm"])
@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_kronecker_factors_are_exact_for_one_example_at_one_position(model, shape, keys, approximation):
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(4).standard_normal(shape))
        params = model.init(jax.random.key(5), x)
        pred_shape = jax.eval_shape(model.apply, params, x).shape
        y = jnp.asarray(np.random.default_rng(6).standard_normal(pred_shape))
        loss = losses.MSE()
        (factors,) = jax.jit(curvature.kfac_factors(model, loss, approximation=approximation))(params, x, y).values()
        (block,) = factors.blocks
        n_out = block.G.shape[0]
        rows = [params[k].reshape(-1, n_out).shape[0] for k in keys[:-1]]
        assert block.A.shape[0] == sum(rows) + 1
        exact = _kron_ggn_block(model, loss, params, x, y, keys)
        # our stacking is [w rows; b] row-major, the same order as the flat reference
        assert jnp.allclose(jnp.kron(block.A, block.G), exact, rtol=1e-10, atol=1e-12)


def test_expand_and_reduce_on_a_sequence_match_their_definitions():
    """A Dense over (B, T, n): A and G from the inputs and from the output cotangents of the
    factor columns, computed by JAX autodiff of the rest of the network."""
    with jax.enable_x64(True):
        first, rest = nn.Dense(3), nn.Serial(nn.Tanh(), nn.Dense(2))
        model = nn.Serial(first, nn.Tanh(), nn.Dense(2))
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.standard_normal((2, 4, 5)))
        params = model.init(jax.random.key(8), x)
        y = jnp.asarray(rng.standard_normal((2, 4, 2)))
        loss = losses.MSE()
        z = first.apply(params[0], x)
        rest_params = (params[1], params[2])
        pred, pull = jax.vjp(lambda zz: rest.apply(rest_params, zz), z)
        s = loss.hessian_factor(pred, y)
        g = jnp.stack([pull(s[..., m])[0] for m in range(s.shape[-1])])  # (M, B, T, 3)
        a = jnp.concatenate([x, jnp.ones((2, 4, 1))], axis=-1)
        expected = {"expand": (jnp.einsum("bti,btj->ij", a, a) / 8, jnp.einsum("mbti,mbtj->ij", g, g)),
                    "reduce": (jnp.einsum("bi,bj->ij", a.mean(1), a.mean(1)) / 2,
                               jnp.einsum("mbi,mbj->ij", g.sum(2), g.sum(2)))}
        for approximation, (a_ref, g_ref) in expected.items():
            block = curvature.kfac_factors(model, loss, approximation=approximation)(params, x, y)["0"].blocks[0]
            assert jnp.allclose(block.A, a_ref, rtol=1e-12) and jnp.allclose(block.G, g_ref, rtol=1e-10)


def test_factors_cover_attention_and_norms_and_run_under_jit():
    model = nn.Serial(nn.TransformerBlock(2, 8), nn.Dense(2))
    params, x, y = _problem(model, (2, 3, 4), CE, "labels")
    with jax.enable_x64(True):
        p64, x64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (params, x))
        factors = jax.jit(curvature.kfac_factors(model, CE))(p64, x64, y)
        diag = jax.jit(curvature.diag_ggn(model, CE))(p64, x64, y)
        blocks = factors["0"].blocks
        assert len(blocks) >= 6  # four attention projections and the two MLP layers
        assert all(jnp.allclose(b.A, b.A.T) and jnp.all(jnp.linalg.eigvalsh(b.G) > -1e-10) for b in blocks)
        # parameters outside every block (the LayerNorms) carry the exact GGN diagonal
        norm_keys = [k for k in factors["0"].diagonal if k.startswith("ln")]
        assert norm_keys
        for k in norm_keys:
            for d, e in zip(jax.tree_util.tree_leaves(factors["0"].diagonal[k]),
                            jax.tree_util.tree_leaves(diag[0][k])):
                assert jnp.allclose(d, e, rtol=1e-10)
    with_grads = curvature.kfac_factors(model, CE, mc_samples=2, with_grads=True)
    value, grads, _ = jax.jit(with_grads)(params, x, y, key=jax.random.key(0))
    ref_value, ref_grads = jax.jit(fbp.value_and_grad(model, CE))(params, x, y)
    assert jnp.allclose(value, ref_value, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- errors
def test_clear_errors():
    model = nn.Serial(nn.Dense(3), nn.BatchNorm(), nn.Dense(2))
    params, x, y = _problem(nn.Serial(nn.Dense(3), nn.Dense(2)), (4, 3), CE, "labels")
    bn_params = model.init(jax.random.key(0), x)
    state = model.init_state(bn_params)
    with pytest.raises(fbp.InputError, match="BatchNorm.*mixes the examples of a batch in training mode"):
        curvature.diag_ggn(model, CE, has_state=True, train=True)(bn_params, state, x, y)
    with pytest.raises(fbp.InputError, match="key="):
        curvature.diag_ggn_mc(FAMILIES[0][1], CE)(*_problem(*FAMILIES[0][1:]))
    with pytest.raises(ValueError, match="mc_samples"):
        curvature.diag_ggn_mc(FAMILIES[0][1], CE, 0)
    with pytest.raises(ValueError, match="approximation"):
        curvature.kfac_factors(FAMILIES[0][1], CE, approximation="average")
    with pytest.raises(fbp.InputError, match="Hessian factor"):
        curvature.diag_ggn(FAMILIES[0][1], object())
    with pytest.raises(fbp.InputError, match="at path '1'.*second_derivative"):
        curvature.diag_hessian(nn.Serial(nn.Dense(3), nn.LayerNorm()), CE)
    with pytest.raises(fbp.InputError, match="at path '0'.*branches"):
        curvature.diag_hessian(nn.Serial(nn.Residual(nn.Dense(3))), CE)
