"""Remat: the same numbers as the block without it, and less memory under XLA."""

import jax
import jax.numpy as jnp
import numpy as np

import fbp
from fbp import losses, nn

CCE = losses.CategoricalCrossEntropy(from_logits=True)


def _block(width=8):
    return nn.Serial(nn.Dense(width), nn.Tanh(), nn.Dropout(0.25), nn.Dense(width), nn.BatchNorm(), nn.ReLU())


def test_check_passes_and_gradients_state_and_masks_equal_the_plain_block(dtype, jit):
    plain = nn.Serial(_block(), nn.Dense(3))
    remat = nn.Serial(nn.Remat(_block()), nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 5), dtype)
    y = jnp.arange(6) % 3
    p_plain = jax.tree_util.tree_map(lambda a: a.astype(dtype), plain.init(jax.random.PRNGKey(1), x))
    p_remat = ({"block": p_plain[0]}, p_plain[1])
    key = jax.random.PRNGKey(7)  # the same dropout masks: replayed in the backward from the kept key
    fbp.check.assert_layer(remat, p_remat, x, state=remat.init_state(p_remat), key=key, train=True, dtype=dtype,
                           jit=jit, fd=False)
    run = (lambda f: jax.jit(f)) if jit else (lambda f: f)
    v1, g1, s1 = run(fbp.value_and_grad(plain, CCE, has_state=True))(p_plain, plain.init_state(p_plain), x, y,
                                                                      key=key)
    v2, g2, s2 = run(fbp.value_and_grad(remat, CCE, has_state=True))(p_remat, remat.init_state(p_remat), x, y,
                                                                      key=key)
    # the same operations (compiled inside a cond, so XLA may fuse them differently: not always to the bit)
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(v1, v2, rtol=tol)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves((g2[0]["block"], g2[1])), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves((s2[0]["block"], s2[1])), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_paths_and_a_wrong_params_tree():
    model = nn.Serial(nn.Remat(nn.Serial(nn.Dense(4), nn.Tanh())), nn.Dense(2))
    x = jnp.ones((3, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    report = fbp.check.layer(model, params, x)
    assert report.ok and "0/block/0/w" in {row.path for row in report.rows}
    try:
        model.apply((params[0]["block"], params[1]), x)
    except fbp.InputError as e:
        assert "expects params as a dict with the key 'block'" in str(e) and "at path '0'" in str(e)
    else:
        raise AssertionError("a params tree without 'block' was accepted")


def test_xla_keeps_only_the_block_inputs():
    """The recomputation stays in the backward: XLA's temporary memory of the gradient drops
    (a recomputation merged with the forward, or hoisted beside it, would not lower it)."""
    def stack(wrap):
        blocks = [wrap(nn.Serial(*[layer for _ in range(4) for layer in (nn.Dense(64), nn.Tanh())])) for _ in range(4)]
        return nn.Serial(*blocks, nn.Dense(3))

    x = jax.random.normal(jax.random.PRNGKey(0), (512, 64))
    y = jnp.arange(512) % 3
    temps = []
    for wrap in (lambda b: b, nn.Remat):
        model = stack(wrap)
        params = model.init(jax.random.PRNGKey(1), x)
        compiled = jax.jit(fbp.value_and_grad(model, CCE)).lower(params, x, y).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temps[1] < 0.6 * temps[0], temps
