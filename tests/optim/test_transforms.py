"""Clipping, penalties and chaining: edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import optim


def test_clip_by_value():
    tx = optim.clip(0.5)
    u, _ = tx.update({"a": jnp.array([-2.0, 0.1, 3.0])}, tx.init(None))
    np.testing.assert_allclose(u["a"], [-0.5, 0.1, 0.5], rtol=1e-7)


def test_clip_by_global_norm_scales_only_when_needed():
    tx = optim.clip_by_global_norm(1.0)
    g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(optim.global_norm(u), 1.0, rtol=1e-6)
    np.testing.assert_allclose(u["a"], [0.6, 0.0], rtol=1e-6)
    assert float(state.global_norm) == pytest.approx(5.0)
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4])}
    u, _ = tx.update(small, state)
    np.testing.assert_array_equal(u["a"], small["a"])


def test_clip_by_global_norm_all_zero_is_not_nan_and_nonfinite_is_reported():
    tx = optim.clip_by_global_norm(1.0)
    zeros = {"a": jnp.zeros(3)}
    u, state = jax.jit(tx.update)(zeros, tx.init(zeros))
    np.testing.assert_array_equal(u["a"], 0.0)
    bad = {"a": jnp.array([1.0, jnp.inf, 0.0])}
    u, state = jax.jit(tx.update)(bad, state)
    assert not jnp.isfinite(state.global_norm)
    assert jnp.isnan(u["a"]).all()  # not silently turned into a finite step


def test_penalties_and_decay():
    params = {"w": jnp.array([2.0, -1.0, 0.0])}
    g = {"w": jnp.array([0.5, 0.5, 0.5])}
    u, _ = optim.add_l2_penalty(0.1).update(g, optim.EmptyState(), params)
    np.testing.assert_allclose(u["w"], [0.7, 0.4, 0.5])
    u, _ = optim.add_l1_penalty(0.1).update(g, optim.EmptyState(), params)
    np.testing.assert_allclose(u["w"], [0.6, 0.4, 0.5])
    u, _ = optim.add_decayed_weights(0.1, mask={"w": False}).update(g, optim.EmptyState(), params)
    np.testing.assert_allclose(u["w"], g["w"])
    with pytest.raises(ValueError, match="needs the parameters"):
        optim.add_l2_penalty(0.1).update(g, optim.EmptyState())


def test_l2_penalty_is_the_gradient_of_half_lambda_norm_squared():
    params = {"w": jnp.array([1.0, -3.0])}
    penalty_grad = jax.grad(lambda p: 0.5 * 0.2 * jnp.sum(p["w"] ** 2))(params)
    u, _ = optim.add_l2_penalty(0.2).update({"w": jnp.zeros(2)}, optim.EmptyState(), params)
    np.testing.assert_allclose(u["w"], penalty_grad["w"])


def test_chain_composes_in_order_and_apply_updates_keeps_dtype():
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.scale(-0.5))
    g = {"a": jnp.array([3.0, 4.0])}
    u, state = tx.update(g, tx.init(g))
    np.testing.assert_allclose(u["a"], [-0.3, -0.4], rtol=1e-6)
    assert isinstance(state, tuple) and len(state) == 2
    p = optim.apply_updates({"a": jnp.ones(2, jnp.bfloat16)}, {"a": jnp.ones(2, jnp.float32)})
    assert p["a"].dtype == jnp.bfloat16


def test_identity_and_empty_global_norm():
    u, _ = optim.identity().update({"a": jnp.ones(1)}, optim.identity().init(None))
    np.testing.assert_array_equal(u["a"], 1.0)
    assert float(optim.global_norm({})) == 0.0
