"""Alternative credit assignment against NumPy written from each rule's equations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import check, credit, losses, nn, optim, train
from fbp.core import InputError

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MLP = nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(7), nn.Tanh(), nn.Dense(3))


def _data(n=10):
    x = jax.random.normal(jax.random.PRNGKey(0), (n, 5))
    return x, jnp.arange(n) % 3


def _numpy_mlp_backward(params, x, y, feedback):
    """Backward through MLP with each Dense's d_x = d_y @ feedback(i, W_i).T (NumPy, float64)."""
    ws = [np.asarray(params[i]["w"]) for i in (0, 2, 4)]
    bs = [np.asarray(params[i]["b"]) for i in (0, 2, 4)]
    h0 = np.asarray(x)
    h1 = np.tanh(h0 @ ws[0] + bs[0])
    h2 = np.tanh(h1 @ ws[1] + bs[1])
    z = h2 @ ws[2] + bs[2]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = (p - np.eye(3)[np.asarray(y)]) / len(y)
    d_w2, d_h2 = h2.T @ e, e @ feedback(2, ws[2]).T
    d_a2 = d_h2 * (1 - h2 ** 2)
    d_w1, d_h1 = h1.T @ d_a2, d_a2 @ feedback(1, ws[1]).T
    d_a1 = d_h1 * (1 - h1 ** 2)
    return [h0.T @ d_a1, d_w1, d_w2], e, (h1, h2)


def test_feedback_alignment_and_sign_symmetry_are_their_equations(jit):
    with jax.enable_x64(True):
        x, y = _data()
        params = MLP.init(jax.random.PRNGKey(1), x)
        fa = credit.feedback_alignment(MLP)
        state = fa.init_state(params)
        f = fbp.value_and_grad(fa, CCE, has_state=True)
        _, grads, new_state = (jax.jit(f) if jit else f)(params, state, x, y)
        bs = {1: np.asarray(state[2]["feedback"]), 2: np.asarray(state[4]["feedback"])}
        expected, _, _ = _numpy_mlp_backward(params, x, y, lambda i, w: bs[i])
        for got, want in zip((grads[0]["w"], grads[2]["w"], grads[4]["w"]), expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        assert new_state is not None and state[0]["feedback"].shape == params[0]["w"].shape
        usf = credit.sign_symmetry(MLP)
        _, grads = fbp.value_and_grad(usf, CCE)(params, x, y)
        rms = lambda w: np.sqrt(np.mean(w ** 2))  # noqa: E731
        expected, _, _ = _numpy_mlp_backward(params, x, y, lambda i, w: np.sign(w) * rms(w))
        for got, want in zip((grads[0]["w"], grads[2]["w"], grads[4]["w"]), expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_direct_feedback_alignment_is_its_equation(jit):
    with jax.enable_x64(True):
        x, y = _data()
        params = MLP.init(jax.random.PRNGKey(1), x)
        dfa = credit.direct_feedback_alignment(MLP, x)
        assert dfa.targets == (2, 4)
        state = dfa.init_state(params)
        f = fbp.value_and_grad(dfa, CCE, has_state=True)
        _, grads, _ = (jax.jit(f) if jit else f)(params, state, x, y)
        ws = [np.asarray(params[i]["w"]) for i in (0, 2, 4)]
        _, e, (h1, h2) = _numpy_mlp_backward(params, x, y, lambda i, w: w)
        b2, b4 = np.asarray(state["feedback"]["2"]), np.asarray(state["feedback"]["4"])
        d_a2 = (e @ b4) * (1 - h2 ** 2)  # h2 receives e B_4
        d_a1 = (e @ b2) * (1 - h1 ** 2)  # h1 receives e B_2
        np.testing.assert_allclose(grads[4]["w"], h2.T @ e, rtol=1e-12)
        np.testing.assert_allclose(grads[2]["w"], h1.T @ d_a2, rtol=1e-12)
        np.testing.assert_allclose(grads[0]["w"], np.asarray(x).T @ d_a1, rtol=1e-12)
        assert ws[0].shape == grads[0]["w"].shape


@pytest.mark.parametrize("make", [lambda m, x: credit.feedback_alignment(m, seed=3),
                                  lambda m, x: credit.sign_symmetry(m),
                                  lambda m, x: credit.direct_feedback_alignment(m, x)], ids=["fa", "usf", "dfa"])
def test_check_model_names_the_deviating_paths_and_passes(make):
    cnn = nn.Serial(nn.Conv2D(3, 3), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(), nn.Dense(6), nn.Tanh(), nn.Dense(3))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 2))
    model = make(cnn, x)
    params = model.init(jax.random.PRNGKey(1), x)
    state = model.init_state(params) if model.has_state else None
    report = check.model(model, CCE, params, x, jnp.arange(4) % 3, state=state)
    assert report.ok, str(report)
    named = [n for n in report.notes if "by design" in n]
    assert len(named) == (1 if isinstance(model, credit.DirectFeedbackAlignment) else 3)
    assert all(row.against == "jax" for row in report.rows)  # finite differences skipped: not a derivative


def test_check_catches_a_wrong_feedback_rule():
    @dataclasses.dataclass(frozen=True)
    class Transposed(credit.FeedbackAlignment):
        def _feedback(self, w, kernel):
            return 1.01 * kernel

    layer = Transposed(nn.Dense(4))
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    params = layer.init(jax.random.PRNGKey(1), x)
    report = check.layer(layer, params, x, state=layer.init_state(params))
    assert not report.ok and [r.path for r in report.failures] == ["x"]


def test_feedback_weights_survive_training_with_adamw_bit_for_bit():
    x, y = _data(40)
    fa = credit.feedback_alignment(MLP)
    params = fa.init(jax.random.PRNGKey(1), x)
    state = fa.init_state(params)
    result = train.fit(fa, CCE, optim.adamw(1e-2, weight_decay=0.5), params, x, y, key=jax.random.PRNGKey(2),
                       epochs=3, batch_size=8, progress=False, state=state)
    for before, after in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(result.state)):
        np.testing.assert_array_equal(before, after)
    assert not np.allclose(result.params[0]["w"], params[0]["w"])  # the weights did train


def test_bad_input_names_the_path():
    x, y = _data()
    with pytest.raises(InputError, match=r"at path '1'.*has none.*\['0', '2', '4'\]"):
        credit.feedback_alignment(MLP, paths=["1"])
    with pytest.raises(InputError, match=r"no leaf layer at path '7'"):
        credit.sign_symmetry(MLP, paths="7")
    fa = credit.feedback_alignment(MLP, paths=["2"])
    params = fa.init(jax.random.PRNGKey(0), x)
    with pytest.raises(InputError, match="has_state=True"):
        fbp.value_and_grad(fa, CCE)
    with pytest.raises(InputError, match=r"at path '2'.*feedback matrix in the state"):
        fbp.value_and_grad(fa, CCE, has_state=True)(params, ((), (), {"feedback": jnp.ones((2, 2))}, (), ()), x, y)
    with pytest.raises(InputError, match="needs an nn.Serial"):
        credit.direct_feedback_alignment(nn.Dense(3), x)
    with pytest.raises(InputError, match="target 0"):
        credit.direct_feedback_alignment(MLP, x, targets=[0])
    with pytest.raises(InputError, match="Dense, Conv1D"):
        credit.FeedbackAlignment(nn.Tanh())
