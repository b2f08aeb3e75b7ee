"""Every loss's backward vs jax.grad; reductions; kinks; stability of the logit forms; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fbp
from fbp import losses
from fbp.catalog import losses_cases


@pytest.mark.parametrize("case", range(len(losses_cases(jax.random.PRNGKey(0)))))
def test_matches_jax(case, dtype, jit):
    loss, pred, target = losses_cases(jax.random.PRNGKey(3))[case]
    fbp.check.assert_loss(loss, pred, target, dtype=dtype, jit=jit)


ELEMENTWISE = [losses.MSE(), losses.MAE(), losses.Huber(delta=0.5), losses.BinaryCrossEntropy(from_logits=True),
               losses.Hinge()]


@settings(max_examples=16)
@given(loss=st.sampled_from(ELEMENTWISE), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 1000))
def test_random_shapes_and_reductions(loss, shape, reduction, seed):
    loss = type(loss)(**{**loss.__dict__, "reduction": reduction})
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    pred = 2 * jax.random.normal(k1, tuple(shape))
    target = jnp.sign(jax.random.normal(k2, tuple(shape))) if isinstance(loss, losses.Hinge) else \
        jax.random.uniform(k2, tuple(shape))
    fbp.check.assert_loss(loss, pred, target, jit=True)


@settings(max_examples=10)
@given(n=st.integers(1, 5), t=st.integers(1, 3), c=st.integers(2, 6), seed=st.integers(0, 1000),
       loss=st.sampled_from([losses.CategoricalCrossEntropy(from_logits=True), losses.MulticlassHinge()]))
def test_class_losses_over_sequences(n, t, c, seed, loss):
    pred = 3 * jax.random.normal(jax.random.PRNGKey(seed), (n, t, c))
    labels = jax.random.randint(jax.random.PRNGKey(seed + 1), (n, t), 0, c)
    fbp.check.assert_loss(loss, pred, labels, jit=True)


def _both(loss, pred, target):
    d_fbp = loss.backward(loss.forward(pred, target)[1], 1.0)
    d_jax = jax.grad(lambda p: loss(p, target))(pred)
    return d_fbp, d_jax


KINKS = [
    ("MAE at pred == target", losses.MAE(), jnp.array([[0.0, 1.0], [2.0, -1.0]]), jnp.array([[0.0, 1.0], [1.0, -1.0]])),
    ("Huber at +delta and -delta", losses.Huber(delta=1.0), jnp.array([[1.0, -1.0], [0.0, 3.0]]),
     jnp.zeros((2, 2))),
    ("Hinge at the margin", losses.Hinge(), jnp.array([[1.0], [-1.0], [0.5], [2.0]]),
     jnp.array([[1.0], [1.0], [-1.0], [-1.0]]) * jnp.array([[1.0], [-1.0], [1.0], [1.0]])),
    ("MulticlassHinge at the margin", losses.MulticlassHinge(), jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
     jnp.array([0, 2])),
]


@pytest.mark.parametrize("name, loss, pred, target", KINKS, ids=[k[0] for k in KINKS])
def test_kinks_follow_jax_exactly(name, loss, pred, target, dtype):
    d_fbp, d_jax = _both(loss, pred.astype(dtype), target.astype(target.dtype if target.dtype == jnp.int32 else dtype))
    np.testing.assert_array_equal(d_fbp, d_jax)


def test_documented_kink_values():
    d, _ = _both(losses.MAE(reduction="sum"), jnp.array([[0.0]]), jnp.array([[0.0]]))
    assert float(d[0, 0]) == 1.0  # jax.grad(jnp.abs)(0.) == 1
    d, _ = _both(losses.Hinge(reduction="sum"), jnp.array([[1.0]]), jnp.array([[1.0]]))
    assert float(d[0, 0]) == 0.0  # at the margin
    d, _ = _both(losses.Huber(delta=2.0, reduction="sum"), jnp.array([[2.0]]), jnp.array([[0.0]]))
    assert float(d[0, 0]) == 2.0  # both branches have slope delta there


@pytest.mark.parametrize("loss, target", [
    (losses.BinaryCrossEntropy(from_logits=True), jnp.array([[1.0, 0.0, 1.0, 0.0]])),
    (losses.CategoricalCrossEntropy(from_logits=True), jnp.array([[0.0, 1.0, 0.0, 0.0]]))])
def test_logit_forms_finite_at_1e4(loss, target):
    z = jnp.array([[1e4, -1e4, -1e4, 1e4]])
    value, res = loss.forward(z, target)
    d = loss.backward(res, 1.0)
    assert jnp.isfinite(value) and jnp.isfinite(d).all()
    assert float(value) > 1e3  # confidently wrong logits cost ~1e4, not inf or nan


def test_values_match_textbook_formulas():
    p = jnp.array([[0.2, 0.7], [0.9, 0.4]])
    t = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(losses.MSE()(p, t), np.mean((p - t) ** 2), rtol=1e-6)
    np.testing.assert_allclose(losses.MSE(reduction="sum")(p, t), np.sum(np.mean((p - t) ** 2, axis=1)), rtol=1e-6)
    np.testing.assert_allclose(losses.MAE(reduction="none")(p, t), np.mean(np.abs(p - t), axis=1), rtol=1e-6)
    bce = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    np.testing.assert_allclose(losses.BinaryCrossEntropy()(p, t), bce, rtol=1e-6)
    z = jnp.log(p / (1 - p))
    np.testing.assert_allclose(losses.BinaryCrossEntropy(from_logits=True)(z, t), bce, rtol=1e-5)
    logits = jnp.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(losses.CategoricalCrossEntropy(from_logits=True)(logits, jnp.array([2])),
                               -jax.nn.log_softmax(logits)[0, 2], rtol=1e-6)
    np.testing.assert_allclose(losses.MulticlassHinge()(jnp.array([[3.2, 5.1, -1.7]]), jnp.array([0])), 2.9,
                               rtol=1e-6)  # the CS231n worked example


def test_integer_labels_equal_one_hot():
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    labels = jnp.array([0, 3, 1, 1, 2])
    for loss in (losses.CategoricalCrossEntropy(from_logits=True), losses.MulticlassHinge()):
        v1, r1 = loss.forward(z, labels)
        v2, r2 = loss.forward(z, jax.nn.one_hot(labels, 4))
        np.testing.assert_allclose(v1, v2)
        np.testing.assert_allclose(loss.backward(r1), loss.backward(r2))


def test_target_shape_mismatch_names_the_loss_and_shapes():
    with pytest.raises(fbp.InputError, match=r"MSE\(reduction='mean'\).*prediction's shape \(4, 1\).*\(4,\) float32"):
        losses.MSE()(jnp.ones((4, 1)), jnp.ones(4))
    with pytest.raises(fbp.InputError, match=r"integer labels of shape \(4,\), received \(4, 2\) int32"):
        losses.CategoricalCrossEntropy()(jnp.ones((4, 3)), jnp.ones((4, 2), jnp.int32))
    with pytest.raises(fbp.InputError, match="prediction must be a floating-point array"):
        losses.MSE()(jnp.ones(4, jnp.int32), jnp.ones(4, jnp.int32))


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.MSE(reduction="average")
    with pytest.raises(ValueError, match="delta must be > 0"):
        losses.Huber(delta=0.0)
    loss = losses.MSE(reduction="none")
    _, res = loss.forward(jnp.ones((3, 2)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"g of shape \(3,\)"):
        loss.backward(res, jnp.ones(2))
