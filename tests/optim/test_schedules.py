"""Schedules: values at known steps; schedules in place of a learning rate; reading the rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import optim


def _at(schedule, steps):
    return np.array([float(schedule(jnp.asarray(s))) for s in steps])


def test_constant_and_linear():
    np.testing.assert_allclose(_at(optim.constant_schedule(0.3), [0, 10, 1000]), 0.3, rtol=1e-7)
    np.testing.assert_allclose(_at(optim.linear_schedule(1.0, 0.0, 10, transition_begin=5), [0, 5, 10, 15, 100]),
                               [1.0, 1.0, 0.5, 0.0, 0.0], atol=1e-7)


def test_exponential_decay():
    s = optim.exponential_decay(1.0, transition_steps=10, decay_rate=0.5)
    np.testing.assert_allclose(_at(s, [0, 5, 10, 20]), [1.0, 0.5**0.5, 0.5, 0.25], rtol=1e-6)
    s = optim.exponential_decay(1.0, 10, 0.5, staircase=True, end_value=0.2)
    np.testing.assert_allclose(_at(s, [0, 9, 10, 19, 20, 30, 100]), [1, 1, 0.5, 0.5, 0.25, 0.2, 0.2], rtol=1e-6)
    s = optim.exponential_decay(1.0, 10, 0.5, transition_begin=10)
    np.testing.assert_allclose(_at(s, [0, 10, 20]), [1.0, 1.0, 0.5], rtol=1e-6)


def test_piecewise_constant():
    s = optim.piecewise_constant_schedule(0.1, {10: 0.5, 20: 0.1})
    np.testing.assert_allclose(_at(s, [0, 9, 10, 19, 20, 50]), [0.1, 0.1, 0.05, 0.05, 0.005, 0.005], rtol=1e-6)


def test_cosine_decay_and_warmup():
    s = optim.cosine_decay_schedule(1.0, decay_steps=100, alpha=0.1)
    np.testing.assert_allclose(_at(s, [0, 50, 100, 200]), [1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    s = optim.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=10, decay_steps=110, end_value=0.0)
    np.testing.assert_allclose(_at(s, [0, 5, 10, 60, 110, 500]), [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_schedule_as_learning_rate_and_reading_it_back():
    schedule = optim.piecewise_constant_schedule(1.0, {2: 0.1})
    tx = optim.sgd(schedule, momentum=0.9)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    seen, moves = [], []
    for _ in range(4):
        updates, state = jax.jit(tx.update)({"w": jnp.ones(2)}, state, params)
        seen.append(float(optim.learning_rate(state)))
        moves.append(float(updates["w"][0]))
    np.testing.assert_allclose(seen, [1.0, 1.0, 0.1, 0.1], rtol=1e-6)  # step 0 uses schedule(0)
    np.testing.assert_allclose(moves, [-1.0, -1.9, -0.271, -0.3439], rtol=1e-5)


def test_invalid_schedules():
    for make in (lambda: optim.exponential_decay(1.0, 0, 0.5), lambda: optim.cosine_decay_schedule(1.0, 0),
                 lambda: optim.warmup_cosine_decay_schedule(0.0, 1.0, 10, 5),
                 lambda: optim.piecewise_constant_schedule(1.0, {5: -1.0})):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(ValueError, match="holds no scale_by_learning_rate"):
        optim.learning_rate(optim.scale(2.0).init({}))
