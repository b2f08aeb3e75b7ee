"""Every cell of the capability table (family × extension, ``fbp.capabilities``) against JAX
autodiff of the plain forward, in float64: every family with parameters, and the random ones
(Dropout: the head's per-example quantities under the same mask as the reference's).

The table is generated from the catalogue, and this test is parametrised over the same
catalogue and the same extensions: a new family or a new extension gets its cells checked
without anyone writing a case, and an extension without a reference here fails
``test_every_extension_has_a_reference``. Families whose rules deviate from the gradient by
design (``fbp.credit``, straight-through quantisers) are compared with their own rules applied
to the whole batch (``model.backward`` seeded with one example's cotangent): the per-example
machinery must give what the rule gives, the rule itself being checked by ``fbp check``.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import capabilities, curvature, engine, per_example, privacy, telemetry
from fbp.core import leaf_layers, map_leaf_params, run_forward
from fbp.extensions import Extension

LOSS = capabilities.LOSS
EACH = dataclasses.replace(LOSS, reduction="none")
CLIP = 0.7
BUILT = {"grads": per_example.Grads(), "grad_norms": per_example.GradNorms(),
         "sum_grad_squared": per_example.SumGradSquared(), "variance": per_example.Variance(),
         "clipped_grad": privacy.ClippedGrad(CLIP), "diag_ggn": curvature.DiagGGN(),
         "diag_ggn_mc": curvature.DiagGGNMC(2), "kronecker_factors": curvature.KroneckerFactors(None),
         "ggn_vector_product": curvature.GGNVectorProduct(), "stats": telemetry.Stats(),
         "alignment": telemetry.Alignment()}
CASES = [(name, model, shape, ctx) for name, model, shape, ctx in capabilities.cases()
         if "key" in ctx or any(jnp.issubdtype(a.dtype, jnp.floating) for a in jax.tree_util.tree_leaves(
             jax.eval_shape(lambda m=model, s=shape, c=ctx: capabilities.inputs(m, s, c, jnp.float32)[0])[0]))]


def _deviates(model) -> bool:
    """Rules that are not the gradient by design (feedback alignment, straight-through estimators)."""
    return any(type(leaf).__module__ == "fbp.credit" or type(leaf).__name__ in ("QuantizeWeights", "Sign", "Round")
               for _, leaf in leaf_layers(model))


def _by_path(model, tree):
    out = {}
    map_leaf_params(model, tree, lambda path, leaf, p: out.setdefault(path, p))
    return {k: v for k, v in out.items() if jax.tree_util.tree_leaves(v)}


def _pullback(model, params, x, state, key):
    """``(pred, pull)``: ``pull(cotangent on pred) -> d_params`` by jax.vjp of the plain forward, or
    by the model's own rules for families that deviate by design."""
    if _deviates(model):
        pred, res = run_forward(model, params, x, state=state, key=key, train=True)
        return pred, lambda c: model.backward(res, c)[0]
    pred, pull = jax.vjp(lambda p: model.apply(p, x, state=state, key=key, train=True), params)
    return pred, lambda c: pull(c)[0]


def _reference(model, params, state, x, y, key, sample_key, v=None):
    pred, pull = _pullback(model, params, x, state, key)
    b = pred.shape[0]
    one = lambda e: pull(jax.grad(lambda z: jnp.sum(EACH(z, y) * e))(pred))  # noqa: E731
    per = jax.vmap(one)(jnp.eye(b, dtype=pred.dtype))  # per-example gradients, batch first
    eye = jnp.eye(pred.size, dtype=pred.dtype).reshape(pred.size, *pred.shape)
    jac = jax.vmap(pull)(eye)  # rows: d pred_i / d params
    flat_jac = jnp.concatenate([a.reshape(pred.size, -1) for a in jax.tree_util.tree_leaves(jac)], axis=1)
    hess = jax.hessian(lambda z: LOSS(z, y))(pred).reshape(pred.size, pred.size)
    exact = jnp.einsum("ip,ij,jp->p", flat_jac, hess, flat_jac)
    s = LOSS.sampled_hessian_factor(pred, y, sample_key, 2).reshape(b, -1, 2)
    mc = jnp.sum(jnp.einsum("bcp,bcm->bmp", flat_jac.reshape(b, -1, flat_jac.shape[1]), s) ** 2, axis=(0, 1))
    if v is None:
        return per, _unflatten(params, exact), _unflatten(params, mc)
    flat_v = jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(v)])
    gv = flat_jac.T @ (hess @ (flat_jac @ flat_v))
    return per, _unflatten(params, exact), _unflatten(params, mc), _unflatten(params, gv)


def grads_of_rule(model, params, state, x, y, key):
    """The gradient by the model's rules (fbp's backward, deviating where the rule does)."""
    pred, res = run_forward(model, params, x, state=state, key=key, train=True)
    value, loss_res = LOSS.forward(pred, y)
    return model.backward(res, LOSS.backward(loss_res, jnp.ones((), value.dtype)))[0]


def _keyed(tree) -> dict:
    """``{(key, ...): leaf}`` of a nested dict of arrays."""
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(params, flat):
    leaves, tree = jax.tree_util.tree_flatten(params)
    out, start = [], 0
    for a in leaves:
        out.append(flat[start:start + a.size].reshape(a.shape))
        start += a.size
    return jax.tree_util.tree_unflatten(tree, out)


def _close(a, b, tol=1e-9):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


def _expected(name, model, params, per, exact, mc):
    """Each extension's value from the reference per-example gradients and GGN diagonals."""
    leaf = _by_path(model, per)
    total = jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1) for a in jax.tree_util.tree_leaves(per)))
    c = jnp.minimum(1.0, CLIP / total)
    tree = jax.tree_util.tree_map
    return {"grads": leaf,
            "grad_norms": {p: jnp.sqrt(sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, 1)
                                           for a in jax.tree_util.tree_leaves(g))) for p, g in leaf.items()},
            "sum_grad_squared": {p: tree(lambda a: jnp.sum(a ** 2, 0), g) for p, g in leaf.items()},
            "variance": {p: tree(lambda a: jnp.var(a, 0), g) for p, g in leaf.items()},
            "clipped_grad": {p: tree(lambda a: jnp.tensordot(c, a, 1), g) for p, g in leaf.items()},
            "diag_ggn": None if exact is None else _by_path(model, exact),
            "diag_ggn_mc": None if mc is None else _by_path(model, mc)}[name]


@pytest.mark.parametrize("case", CASES, ids=[c[0][:60] for c in CASES])
def test_every_cell_equals_autodiff_in_float64(case):
    name, model, shape, ctx = case
    row = capabilities.row(model, shape, ctx)
    wanted = [BUILT[e] for e, route in row.items() if not route.startswith(("refused", "no rule"))]
    with jax.enable_x64(True):
        params, state, x, y, _ = capabilities.inputs(model, shape, ctx)
        key = jax.random.PRNGKey(11)
        sampled = any(e.samples for e in wanted)  # the engine splits the key only when something samples
        model_key, sample_key = jax.random.split(key) if model.needs_key and sampled else (key, key)
        direction = jax.tree_util.tree_map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)),
                                           params)

        def run(p, s, a, b, k, v):  # the GGN-vector product's direction is built inside the trace
            chosen = [curvature.GGNVectorProduct(v) if e.name == "ggn_vector_product" else e for e in wanted]
            return engine.run(model, LOSS, chosen, p, a, b, state=s, key=k)[4]

        q = jax.jit(run)(params, state, x, y, key, direction)
        if {e.name for e in wanted} <= {"stats", "ggn_vector_product"}:  # mixes the batch: no per-example quantity
            assert all(route.startswith("refused") for e, route in row.items()
                       if e not in ("stats", "ggn_vector_product", "alignment"))
        stats_of = telemetry.value_grad_and_stats(model, LOSS, input_cotangents=True, alignment=False,
                                                  has_state=state is not None)

        def references(p, s, a, b, k1, k2, v):  # one compiled program for every reference
            stats = stats_of(*((p, s, a, b) if s is not None else (p, a, b)), key=k1)[-1]
            return (*_reference(model, p, s, a, b, k1, k2, v), stats)

        per, exact, mc, gv, stats = jax.jit(references)(params, state, x, y, model_key, sample_key, direction)
        for e in wanted:
            if e.name == "alignment":  # the rule's gradient against jax.grad's, leaf by leaf
                exact = _by_path(model, jax.grad(lambda p: LOSS(model.apply(p, x, state=state, key=model_key,
                                                                             train=True), y))(params))
                rule = _by_path(model, grads_of_rule(model, params, state, x, y, model_key))
                for path, angle in q["alignment"].items():
                    a, b = (jnp.concatenate([t.ravel() for t in jax.tree_util.tree_leaves(d[path])])
                            for d in (rule, exact))
                    cos = jnp.clip(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)), -1, 1)
                    # arccos near 1 turns float64 rounding into ~1e-6 degrees
                    np.testing.assert_allclose(angle, jnp.degrees(jnp.arccos(cos)), atol=1e-5)
            elif e.name == "stats":  # telemetry's own pass, held to autodiff in test_telemetry.py
                _close(q["stats"], stats, 1e-9)
            elif e.name == "ggn_vector_product":  # Jᵀ H J v with the dense Jacobian and Hessian
                _close(q[e.name], _by_path(model, gv))
            elif e.name == "kronecker_factors":  # exact GGN diagonal where there is no block
                diag = _by_path(model, exact)
                for path, factors in q[e.name].items():
                    covered = {k for block in factors.blocks for k, _ in block.kernels} | \
                              {block.bias for block in factors.blocks if block.bias}
                    ref = _keyed(diag[path])
                    for k, v in _keyed(factors.diagonal).items():
                        if k not in covered:
                            _close(v, ref[k])
            else:
                _close(q[e.name], _expected(e.name, model, params, per, exact, mc))


def test_every_extension_has_a_reference():
    import fbp  # every built-in extension class, wherever it is defined

    def subclasses(cls):
        return {c for s in cls.__subclasses__() for c in {s} | subclasses(s)}

    # fbp.diagnostics' extensions are whole-model summaries of these quantities, each held to its
    # reference in tests/test_diagnostics.py (test_every_diagnostic_extension_is_checked there)
    built_in = {c.name for c in subclasses(Extension) if c.__module__.startswith("fbp.") and c.name
                and not c.__module__.startswith("fbp.diagnostics")}
    assert fbp is not None and built_in == set(capabilities.EXTENSIONS) == set(BUILT)


def test_the_docs_page_is_the_generated_table():
    page = (pathlib.Path(__file__).parent.parent / "docs" / "guides" / "capabilities.md").read_text()
    assert capabilities.markdown() in page, "regenerate: python -m fbp.capabilities (see the page)"


def test_the_reference_catches_a_planted_error():
    """A per-example gradient off by a factor on one example fails the same comparison."""
    name, model, shape, ctx = next(c for c in CASES if c[0].startswith("Dense(features=7)"))
    with jax.enable_x64(True):
        params, state, x, y, _ = capabilities.inputs(model, shape, ctx)
        q = jax.jit(lambda p, a, b: engine.run(model, LOSS, [BUILT["grads"]], p, a, b)[4])(params, x, y)
        per = jax.jit(lambda p, a, b: _reference(model, p, None, a, b, None, jax.random.PRNGKey(0))[0])(params, x, y)
        wrong = jax.tree_util.tree_map(lambda a: a.at[-1].multiply(1.001), q["grads"])
        with pytest.raises(AssertionError):
            _close(wrong, _expected("grads", model, params, per, None, None))
