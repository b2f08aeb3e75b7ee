"""fbp.spectrum and fbp.lanczos against dense references in float64: the GGN ``Jᵀ H J`` from
``jax.vjp`` rows and ``jax.hessian`` of the loss, ``numpy.linalg.eigvalsh`` for the spectrum — on
small models of several families.
Each check is shown to catch a planted error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _dense_reference import CASES, case, x64  # noqa: F401  (x64: the module runs in float64)
from _dense_reference import dense as _dense

from fbp import losses, nn, second_order, spectrum
from fbp.lanczos import lanczos

LOSS = losses.CategoricalCrossEntropy(from_logits=True)


def dense(model, params, state, x, y):
    return _dense(model, params, state, x, y, LOSS)


@pytest.mark.parametrize("kind", list(CASES))
def test_products_equal_the_dense_matrices(kind):
    model, params, state, x, y = case(kind)
    ggn, hessian = dense(model, params, state, x, y)
    v = np.asarray(jax.random.normal(jax.random.key(3), (ggn.shape[0],), jnp.float64))
    ruled = second_order.unsupported(model) is None  # Hessian products where every layer has a second-order rule
    assert ruled  # every family of the cases has its second-order rules
    for curvature, matrix in (("ggn", ggn), ("hessian", hessian))[:2 if ruled else 1]:
        op = spectrum.operator(model, LOSS, params, x, y, curvature=curvature, state=state)
        np.testing.assert_allclose(jax.jit(op.matvec)(v), matrix @ v, rtol=1e-9, atol=1e-11 * np.abs(matrix).max())
        batched = spectrum.operator(model, LOSS, params, x, y, curvature=curvature, state=state, batch_size=3)
        np.testing.assert_allclose(jax.jit(batched.matvec)(v), matrix @ v, rtol=1e-9, atol=1e-11 * np.abs(matrix).max())
    last = list(op.space.groups)[-1] if kind != "mlp" else "2"
    block = spectrum.operator(model, LOSS, params, x, y, layer=last, state=state)
    idx = block.space.indices
    np.testing.assert_allclose(jax.jit(block.matvec)(v[:idx.size]), ggn[np.ix_(idx, idx)] @ v[:idx.size], rtol=1e-9,
                               atol=1e-12)


@pytest.fixture(scope="module")
def mlp_dense():
    model, params, state, x, y = case("mlp", batch=12)
    return (model, params, state, x, y), dense(model, params, state, x, y)


def test_eigenvalues_converge_with_their_residual_bounds(mlp_dense):
    (model, params, state, x, y), (ggn, hessian) = mlp_dense
    assert np.linalg.eigvalsh(hessian).min() < -1e-6  # indefinite: Lanczos on it is tested too
    for curvature, matrix in (("ggn", ggn), ("hessian", hessian)):
        op = spectrum.operator(model, LOSS, params, x, y, curvature=curvature)
        exact = np.linalg.eigvalsh(matrix)[::-1]
        full = spectrum.eigenvalues(op, k=4, iterations=op.dim)
        np.testing.assert_allclose(full.values, exact[:4], rtol=1e-8, atol=1e-12)
        few = jax.jit(lambda p, curvature=curvature: spectrum.eigenvalues(
            spectrum.operator(model, LOSS, p, x, y, curvature=curvature), k=3, iterations=25))(params)
        for value, bound in zip(np.asarray(few.values), np.asarray(few.residuals), strict=True):
            assert np.min(np.abs(np.linalg.eigvalsh(matrix) - value)) <= bound + 1e-10
        np.testing.assert_allclose(few.values[0], exact[0], rtol=1e-6)  # the top one converges first
        plain = spectrum.eigenvalues(op, k=1, iterations=25, reorthogonalize=False)
        np.testing.assert_allclose(plain.values[0], exact[0], rtol=1e-6)  # without reorthogonalisation too
        ritz = np.asarray(few.vectors[0])
        np.testing.assert_allclose(matrix @ ritz, few.values[0] * ritz, atol=float(few.residuals[0]) + 1e-9)
    wrong = spectrum.Operator(lambda v: 0.9 * op.matvec(v), op.dim, op.dtype, op.space)
    assert abs(float(spectrum.eigenvalues(wrong, 1, iterations=op.dim).values[0]) - exact[0]) > 1e-3 * exact[0]


def test_hutchinson_trace_is_within_its_standard_error(mlp_dense):
    (model, params, state, x, y), (ggn, _) = mlp_dense
    op = spectrum.operator(model, LOSS, params, x, y)
    t = spectrum.trace(op, 400, key=jax.random.key(1))
    assert abs(float(t.estimate) - np.trace(ggn)) < 4 * float(t.stderr)
    assert float(t.stderr) < 0.1 * np.trace(ggn)


def test_lanczos_quadrature_is_exact_to_degree_2k_minus_1():
    a = np.asarray(jax.random.normal(jax.random.key(0), (40, 40), jnp.float64))
    a = (a @ a.T) / 40
    v = np.asarray(jax.random.rademacher(jax.random.key(1), (40,), jnp.float64))
    k = 6
    nodes, weights = lanczos(lambda u: a @ u, 40, k, jax.random.key(2), jnp.float64, v).quadrature()
    u = v / np.linalg.norm(v)
    for p in range(2 * k):
        want = u @ np.linalg.matrix_power(a, p) @ u
        np.testing.assert_allclose(np.sum(weights * nodes ** p), want, rtol=1e-9)
    # one degree higher is not exact (the check can fail), and wrong weights are caught
    p = 2 * k + 1
    assert abs(np.sum(weights * nodes ** p) - u @ np.linalg.matrix_power(a, p) @ u) > 1e-9
    t = lanczos(lambda u: a @ u, 40, k, jax.random.key(2), jnp.float64, v)
    vals, vecs = np.linalg.eigh(np.asarray(t.matrix()))
    assert abs(np.sum(vecs[-1] ** 2 * vals ** 2) - u @ a @ a @ u) > 1e-6


def test_density_moments_and_mass(mlp_dense):
    (model, params, state, x, y), (ggn, _) = mlp_dense
    op = spectrum.operator(model, LOSS, params, x, y)
    d = spectrum.density(op, iterations=30, runs=40, key=jax.random.key(4))
    np.testing.assert_allclose(np.asarray(d.weights).sum(axis=1), 1.0, rtol=1e-10)
    for p in (1, 2):
        exact = np.trace(np.linalg.matrix_power(ggn, p)) / op.dim
        assert abs(float(d.moments(p)) - exact) < 0.25 * exact
    grid = np.linspace(float(d.nodes.min()) - 1, float(d.nodes.max()) + 1, 4000)
    mass = np.trapezoid(np.asarray(d.evaluate(grid, sigma=0.05)), grid)
    np.testing.assert_allclose(mass, 1.0, rtol=1e-3)


def test_plot_and_bad_input(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    model, params, state, x, y = case("mlp")
    op = spectrum.operator(model, LOSS, params, x, y)
    ax = spectrum.plot_density(spectrum.density(op, iterations=10, runs=2))
    ax.figure.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="curvature must be"):
        spectrum.operator(model, LOSS, params, x, y, curvature="fisher")
    hooked = nn.Serial(nn.Dense(3), nn.MapCotangent(jnp.negative), nn.Dense(2))
    with pytest.raises(Exception, match=r"MapCotangent.*at path '1'.*second-order term.*curvature='ggn'"):
        spectrum.operator(hooked, LOSS, hooked.init(jax.random.key(0), x), x, y, curvature="hessian")
    with pytest.raises(Exception, match="batch_size=4 must divide the 6 examples"):
        spectrum.operator(model, LOSS, params, x, y, batch_size=4)
    with pytest.raises(Exception, match=r"no layer with parameters at \['9'\]"):
        spectrum.operator(model, LOSS, params, x, y, layer="9")
    with pytest.raises(ValueError, match="k must be in"):
        spectrum.eigenvalues(op, k=0)
    with pytest.raises(Exception, match="k"):
        spectrum.eigenvalues(op, k=2.5)  # an int, not truncated silently


def test_the_iteration_on_params_arrays_equals_the_flat_one(mlp_dense):
    """``Operator.leaf_matvec`` (Lanczos, Hutchinson and SLQ on the params arrays, no flat copies)
    against the flat ``matvec`` path in float64, for the whole model (under jit) and one layer's
    block; ``fbp.lanczos`` on a pytree equals it on the flat vector (the same start, entry for entry)."""
    (model, params, state, x, y), _ = mlp_dense
    for layer in (None, "2"):
        op = spectrum.operator(model, LOSS, params, x, y, layer=layer)
        assert op.leaf_matvec is not None
        v = jax.random.normal(jax.random.key(7), (op.dim,), jnp.float64)
        arrays = op.space.select(op.space.embed(v))
        np.testing.assert_allclose(jnp.concatenate([a.ravel() for a in arrays]), v, rtol=0, atol=0)
        np.testing.assert_allclose(op.space.restrict(op.space.place(arrays)), v, rtol=0, atol=0)
        products = jax.jit(lambda v, op=op: (op.space.rows([a[None] for a in op.leaf_matvec(
            op.space.select(op.space.embed(v)))])[0], op.matvec(v)))(v)
        np.testing.assert_allclose(*products, rtol=1e-12)

    def run(p, arrays, reorth):
        o = spectrum.operator(model, LOSS, p, x, y)
        return spectrum.eigenvalues(o if arrays else o._replace(leaf_matvec=None), 3, iterations=12,
                                    reorthogonalize=reorth)

    run = jax.jit(run, static_argnums=(1, 2))
    tree, ref = run(params, True, True), run(params, False, True)
    np.testing.assert_allclose(tree.values, ref.values, rtol=1e-10)
    np.testing.assert_allclose(np.abs(tree.vectors), np.abs(ref.vectors), rtol=1e-8, atol=1e-12)
    # without reorthogonalisation lost orthogonality amplifies rounding: the converged top value
    np.testing.assert_allclose(run(params, True, False).values[0], run(params, False, False).values[0], rtol=1e-10)
    flat = op._replace(leaf_matvec=None)  # the last layer's block
    for fn in (lambda o: spectrum.trace(o, 5).estimate, lambda o: spectrum.density(o, 8, 2).nodes):
        np.testing.assert_allclose(fn(op), fn(flat), rtol=1e-10, atol=1e-12)
    # a planted error: one array of the pytree iteration scaled is caught
    wrong = op._replace(leaf_matvec=lambda a: [b * (1.1 if i == 0 else 1) for i, b in enumerate(op.leaf_matvec(a))])
    assert abs(float(spectrum.trace(wrong, 5).estimate) / float(spectrum.trace(flat, 5).estimate) - 1) > 1e-3


def test_rademacher_signs_from_packed_bits():
    """32 signs per Threefry word: ±1, fair, uncorrelated across bit positions and words, the
    same entries flat and as a pytree; a wrong unpacking (one bit repeated) is caught."""
    from fbp.lanczos import rademacher
    key = jax.random.key(3)
    z = np.asarray(rademacher(key, jax.ShapeDtypeStruct((3200 * 32,), jnp.float32)))
    assert set(np.unique(z)) == {-1.0, 1.0}
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    bits = z.reshape(-1, 32)
    corr = np.corrcoef(bits.T)[np.triu_indices(32, 1)]
    assert np.max(np.abs(corr)) < 5 / np.sqrt(bits.shape[0])  # bit positions within a word
    assert abs(np.mean(z[:-1] * z[1:])) < 4 / np.sqrt(z.size)  # neighbours
    tree = rademacher(key, {"a": jnp.zeros((7, 5)), "b": jnp.zeros((3200 * 32 - 35,))})
    np.testing.assert_array_equal(np.concatenate([np.ravel(tree["a"]), tree["b"]]), z)
    repeated = np.repeat(bits[:, :1], 32, axis=1)  # the planted error
    assert np.max(np.abs(np.corrcoef(repeated.T)[np.triu_indices(32, 1)])) > 0.9
