"""fbp.value_and_grad(..., extensions=[...]): several quantities from one pass, each against
jax.vmap(jax.grad) of the plain forward (issue 27, first part: the per-example family)."""

import dataclasses
from typing import ClassVar

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import fbp
from fbp import credit, losses, nn, privacy
from fbp import per_example as pe
from fbp.extensions import Extension

CCE = losses.CategoricalCrossEntropy(from_logits=True)
MODEL = nn.Serial(nn.Conv1D(4, 3), nn.Tanh(), nn.LayerNorm(), nn.Flatten(), nn.Dense(6), nn.GELU(), nn.Dense(3))
ALL = [pe.Grads(), pe.GradNorms(), pe.SumGradSquared(), pe.Variance()]


class CosineToMean(Extension):
    """A user's extension: each example's gradient cosine to the batch mean, per leaf (≤ 25 lines)."""

    name: ClassVar[str] = "cosine_to_mean"
    needs: ClassVar[str] = "grads"

    def finalize(self, found, context):
        out = {}
        for path, per in found.items():
            flat = jnp.concatenate([a.reshape(a.shape[0], -1) for a in jax.tree_util.tree_leaves(per)], axis=1)
            mean = flat.mean(axis=0)
            out[path] = flat @ mean / (jnp.linalg.norm(flat, axis=1) * jnp.linalg.norm(mean) + 1e-30)
        return out


def _data(dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 7, 2), dtype)
    y = jnp.arange(5) % 3
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), MODEL.init(jax.random.PRNGKey(1), x))
    return x, y, params


def _reference(params, x, y):
    one = lambda xb, yb: jax.grad(lambda p: CCE(MODEL.apply(p, xb[None]), yb[None]))(params)  # noqa: E731
    return jax.jit(jax.vmap(one))(x, y)


def _leaves_by_path(tree):
    out = {}
    fbp.core.map_leaf_params(MODEL, tree, lambda path, leaf, p: out.setdefault(path, p))
    return {path: p for path, p in out.items() if jax.tree_util.tree_leaves(p)}


def _close(a, b, tol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, jit, tol", [(jnp.float64, False, 1e-10), (jnp.float32, True, 2e-4)])
def test_every_extension_from_one_call_equals_vmap_of_grad(dtype, jit, tol):
    with jax.enable_x64(dtype == jnp.float64):
        x, y, params = _data(dtype)
        f = fbp.value_and_grad(MODEL, CCE, extensions=[*ALL, CosineToMean()])
        value, grads, q = (jax.jit(f) if jit else f)(params, x, y)
        ref = _leaves_by_path(_reference(params, x, y))
        plain_value, plain_grads = fbp.core.value_and_grad(MODEL, CCE)(params, x, y)
        np.testing.assert_allclose(float(value), float(plain_value), rtol=tol)
        _close(grads, plain_grads, tol)
        assert set(q) == {"grads", "grad_norms", "sum_grad_squared", "variance", "cosine_to_mean"}
        assert set(q["grads"]) == set(ref) == {"0", "2", "4", "6"}
        for path, per in ref.items():
            flat = jnp.concatenate([a.reshape(5, -1) for a in jax.tree_util.tree_leaves(per)], axis=1)
            _close(q["grads"][path], per, tol)
            _close(q["grad_norms"][path], jnp.linalg.norm(flat, axis=1), tol)
            _close(q["sum_grad_squared"][path], jax.tree_util.tree_map(lambda a: jnp.sum(a * a, 0), per), tol)
            _close(q["variance"][path], jax.tree_util.tree_map(lambda a: jnp.var(a, 0), per), tol)
            mean = flat.mean(0)
            _close(q["cosine_to_mean"][path], flat @ mean / (jnp.linalg.norm(flat, axis=1) * jnp.linalg.norm(mean)),
                   tol)


def test_a_wrong_extension_is_caught_by_the_same_comparison():
    class WrongVariance(pe.Variance):  # forgets to subtract the squared mean
        def finalize(self, found, context):
            return {path: jax.tree_util.tree_map(lambda s: s / context.batch, sgs) for path, sgs in found.items()}

    with jax.enable_x64(True):
        x, y, params = _data(jnp.float64)
        q = fbp.value_and_grad(MODEL, CCE, extensions=[WrongVariance()])(params, x, y)[2]
        ref = _leaves_by_path(_reference(params, x, y))
        with pytest.raises(AssertionError):
            _close(q["variance"]["6"], jax.tree_util.tree_map(lambda a: jnp.var(a, 0), ref["6"]), 1e-10)


def test_the_result_has_one_arity_and_a_model_with_state_gets_its_state_back():
    model = credit.feedback_alignment(nn.Serial(nn.Dense(4), nn.Tanh(), nn.Dense(3)))  # B lives in the state
    x, y = jax.random.normal(jax.random.PRNGKey(0), (4, 5)), jnp.arange(4) % 3
    params = model.init(jax.random.PRNGKey(1), x)
    state = model.init_state(params)
    for extensions in ([pe.GradNorms()], ALL):
        out = fbp.value_and_grad(model, CCE, has_state=True, extensions=extensions)(params, state, x, y)
        assert len(out) == 4 and set(out[3]) == {e.name for e in extensions}
        assert jax.tree_util.tree_structure(out[2]) == jax.tree_util.tree_structure(state)
        assert len(fbp.value_and_grad(nn.Dense(3), CCE, extensions=extensions)(
            nn.Dense(3).init(jax.random.PRNGKey(1), x), x, y)) == 3
    with pytest.raises(fbp.InputError, match="has_state=True"):
        fbp.value_and_grad(model, CCE, extensions=[pe.GradNorms()])


def test_bad_extension_lists_are_refused_by_name():
    with pytest.raises(TypeError, match=r"an instance is needed: add \(\)"):
        fbp.value_and_grad(MODEL, CCE, extensions=[pe.GradNorms])
    with pytest.raises(TypeError, match="must be a list of extensions"):
        fbp.value_and_grad(MODEL, CCE, extensions=pe.GradNorms())
    with pytest.raises(ValueError, match=r"\['variance'\] are used twice"):
        fbp.value_and_grad(MODEL, CCE, extensions=[pe.Variance(), pe.Variance()])
    with pytest.raises(ValueError, match="reduction='mean' or 'sum'"):
        fbp.value_and_grad(MODEL, losses.MSE(reduction="none"), extensions=[pe.GradNorms()])

    @dataclasses.dataclass(frozen=True)
    class Nameless(Extension):
        needs: ClassVar[str] = "hessians"

    with pytest.raises(ValueError, match="needs 'hessians'"):
        fbp.value_and_grad(MODEL, CCE, extensions=[Nameless()])


@pytest.mark.parametrize("clip", [0.05, float("inf")])
def test_clipped_grad_as_an_extension_equals_clipping_vmap_of_grad_and_composes(clip):
    """In the same pass as the gradient norms: Σ_b min(1, C/‖g_b‖) g_b against the reference."""
    with jax.enable_x64(True):
        x, y, params = _data(jnp.float64)
        _, _, q = fbp.value_and_grad(MODEL, CCE, extensions=[privacy.ClippedGrad(clip), pe.GradNorms()])(params, x, y)
        ref = _leaves_by_path(_reference(params, x, y))
        norms = jnp.sqrt(sum(jnp.sum(a.reshape(5, -1) ** 2, 1) for per in ref.values()
                             for a in jax.tree_util.tree_leaves(per)))
        c = jnp.minimum(1.0, clip / norms)
        for path, per in ref.items():
            _close(q["clipped_grad"][path], jax.tree_util.tree_map(lambda a: jnp.tensordot(c, a, 1), per), 1e-10)
        _close(sum(q["grad_norms"][p] ** 2 for p in ref), norms ** 2, 1e-10)
        same = privacy.clipped_grad(MODEL, CCE, clip)(params, x, y)[1]
        _close(q["clipped_grad"], _leaves_by_path(same), 1e-12)
    with pytest.raises(ValueError, match="l2_clip must be a finite number"):
        privacy.ClippedGrad(-1.0)


def test_several_extensions_share_one_backward_pass():
    """Each leaf's backward rule runs once per trace, however many extensions are asked for."""
    calls = []

    @dataclasses.dataclass(frozen=True)
    class Counted(nn.Dense):
        independent_examples = True

        def backward(self, res, d_y):
            calls.append(1)
            return super().backward(res, d_y)

    model = nn.Serial(Counted(6), nn.Tanh(), Counted(3))
    x, y = jax.random.normal(jax.random.PRNGKey(0), (4, 5)), jnp.arange(4) % 3
    params = model.init(jax.random.PRNGKey(1), x)
    jax.eval_shape(fbp.value_and_grad(model, CCE, extensions=[*ALL, privacy.ClippedGrad(1.0)]), params, x, y)
    assert len(calls) == 2  # two Dense leaves, one backward each


def test_ggn_diagonals_join_the_same_call_and_equal_the_dense_ggn():
    """DiagGGN (exact) against diag(Jᵀ H J) built with jax.jacrev/jax.hessian; DiagGGNMC equal to
    fbp.curvature.diag_ggn_mc with the same key; both beside the gradient norms in one call."""
    from fbp import curvature

    with jax.enable_x64(True):
        x, y, params = _data(jnp.float64)
        key = jax.random.PRNGKey(7)
        f = fbp.value_and_grad(MODEL, CCE, extensions=[curvature.DiagGGN(), curvature.DiagGGNMC(3), pe.GradNorms()])
        value, grads, q = jax.jit(f)(params, x, y, key=key)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        pred_of = lambda v: MODEL.apply(unravel(v), x)  # noqa: E731
        jac = jax.jacrev(pred_of)(flat).reshape(-1, flat.size)
        hess = jax.hessian(lambda p: CCE(p, y))(pred_of(flat)).reshape(jac.shape[0], jac.shape[0])
        dense = _leaves_by_path(unravel(jnp.diag(jac.T @ hess @ jac)))
        for path, d in dense.items():
            _close(q["diag_ggn"][path], d, 1e-10)
        _close(q["diag_ggn_mc"], _leaves_by_path(curvature.diag_ggn_mc(MODEL, CCE, 3)(params, x, y, key=key)), 1e-12)
        assert set(q["grad_norms"]) == set(dense)
    with pytest.raises(fbp.InputError, match="sample targets: pass key"):
        fbp.value_and_grad(MODEL, CCE, extensions=[curvature.DiagGGNMC()])(params, x, y)
    with pytest.raises(ValueError, match="mc_samples must be a positive int"):
        curvature.DiagGGNMC(0)


def _same_stats(got, want):
    for path, stats in want.items():
        for k, v in stats.items():
            np.testing.assert_allclose(np.asarray(got[path][k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=(path, k))


def test_telemetry_stats_join_the_pass_and_equal_value_grad_and_stats():
    """Every leaf (parameter-free ones too), with BatchNorm in training mode when only Stats asks;
    beside per-example quantities and the GGN diagonal when the model keeps examples apart."""
    from fbp import curvature, telemetry

    bn = nn.Serial(nn.Dense(8), nn.BatchNorm(), nn.ReLU(), nn.Dense(3))
    x, y = jax.random.normal(jax.random.PRNGKey(0), (6, 5)), jnp.arange(6) % 3
    params = bn.init(jax.random.PRNGKey(1), x)
    state = bn.init_state(params)
    value, grads, new_state, q = jax.jit(fbp.value_and_grad(bn, CCE, has_state=True, extensions=[telemetry.Stats()]))(
        params, state, x, y)
    ref = telemetry.value_grad_and_stats(bn, CCE, has_state=True, input_cotangents=True, alignment=False)(
        params, state, x, y)
    _same_stats(q["stats"], ref[3])
    _close((value, grads, new_state), ref[:3], 1e-6)
    with pytest.raises(fbp.InputError, match="BatchNorm.*at path '1': mixes the examples"):
        fbp.value_and_grad(bn, CCE, has_state=True, extensions=[telemetry.Stats(), pe.GradNorms()])(
            params, state, x, y)
    x, y, params = _data(jnp.float32)
    _, _, q = fbp.value_and_grad(MODEL, CCE, extensions=[telemetry.Stats(("d_out_norm", "out_std")), pe.GradNorms(),
                                                         curvature.DiagGGN()])(params, x, y)
    _same_stats(q["stats"], telemetry.value_grad_and_stats(MODEL, CCE, input_cotangents=True, alignment=False,
                                                           stats=("d_out_norm", "out_std"))(params, x, y)[2])
    assert set(q["stats"]) == {"0", "1", "2", "3", "4", "5", "6"} and set(q["grad_norms"]) == {"0", "2", "4", "6"}
    with pytest.raises(ValueError, match="telemetry: stats must be"):
        telemetry.Stats(("bogus",))


def test_alignment_joins_the_pass_and_a_model_without_deviating_rules_is_refused():
    from fbp import telemetry

    with jax.enable_x64(True):
        model = credit.feedback_alignment(nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3)))
        x = jax.random.normal(jax.random.PRNGKey(0), (6, 5), jnp.float64)
        y = jnp.arange(6) % 3
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
        state = model.init_state(params)
        f = jax.jit(fbp.value_and_grad(model, CCE, has_state=True, extensions=[telemetry.Alignment(), pe.Grads()]))
        _, _, _, q = f(params, state, x, y)
        *_, stats = telemetry.value_grad_and_stats(model, CCE, has_state=True)(params, state, x, y)
        assert set(q["alignment"]) == {"0", "2"} and float(q["alignment"]["0"]) > 1.0
        for path, angle in q["alignment"].items():
            np.testing.assert_allclose(angle, stats[path]["alignment_angle"], rtol=1e-12)
    with pytest.raises(fbp.core.InputError, match="exact VJP"):
        x, y, params = _data(jnp.float32)
        fbp.value_and_grad(MODEL, CCE, extensions=[telemetry.Alignment()])(params, x, y)


def test_evaluation_mode_reaches_batchnorm_with_its_running_statistics():
    """train=False: BatchNorm normalises with its state, keeps examples apart, and every
    per-example quantity equals vmap(jax.grad) of the evaluation-mode forward; train=True refuses."""
    with jax.enable_x64(True):
        model = nn.Serial(nn.Dense(4), nn.BatchNorm(), nn.Tanh(), nn.Dense(3))
        x = jax.random.normal(jax.random.PRNGKey(0), (6, 5), jnp.float64)
        y = jnp.arange(6) % 3
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
        state = jax.tree_util.tree_map(lambda a: a + 0.3, model.init_state(params))
        f = jax.jit(fbp.value_and_grad(model, CCE, has_state=True, train=False, extensions=[pe.Grads()]))
        _, _, new_state, q = f(params, state, x, y)
        one = lambda a, b: jax.grad(lambda p: CCE(model.apply(p, a[None], state=state), b[None]))(params)  # noqa: E731
        ref = jax.vmap(one)(x, y)
        for path in ("0", "1", "3"):
            _close(q["grads"][path], ref[int(path)], 1e-12)
        _close(new_state, state, 0)  # evaluation mode leaves the running statistics alone
        with pytest.raises(fbp.core.InputError, match="at path '1'"):
            fbp.value_and_grad(model, CCE, has_state=True, extensions=[pe.Grads()])(params, state, x, y)
