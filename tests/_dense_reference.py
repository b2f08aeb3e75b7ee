"""Dense curvature references by JAX autodiff of the plain forward, shared by the spectrum,
Laplace and influence tests: the GGN ``Jᵀ H J``, the Hessian, output Jacobians and per-example
gradients, all in the flat params' order (``jax.flatten_util.ravel_pytree``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fbp import capabilities

PREFIXES = {"mlp": "Serial(Dense(features=8), Tanh()", "cnn": "Conv2D(features=4, kernel_size=3)",
            "lstm": "LSTM(hidden=4)", "transformer": "TransformerBlock(", "batchnorm-eval": "Serial(Conv2D("}
CASES = {kind: next(c for c in capabilities.cases() if c[0].startswith(prefix)) for kind, prefix in PREFIXES.items()}


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def case(kind, batch=6):
    """``(model, params, state, x, y)`` of a capability case (two-class labels, float64)."""
    _, model, shape, ctx = CASES[kind]
    params, state, x, y, _ = capabilities.inputs(model, (batch, *shape[1:]), ctx)
    return model, params, state, x, y


def dense(model, params, state, x, y, loss):
    """``(G, H)``: the dense GGN and Hessian of ``loss(model(θ, x), y)``."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    out = lambda f: model.apply(unravel(f), x, state=state)  # noqa: E731

    @jax.jit
    def both(flat):
        pred = out(flat)
        rows = jax.jacrev(lambda f: out(f).ravel())(flat)
        h_out = jax.hessian(lambda z: loss(z.reshape(pred.shape), y))(pred.ravel())
        return rows.T @ h_out @ rows, jax.hessian(lambda f: loss(out(f), y))(flat)

    return tuple(np.asarray(m) for m in both(flat))


def jacobians(model, params, state, x):
    """``(B, C, P)``: each example's output Jacobian."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    one = lambda xb: jax.jacrev(lambda f: model.apply(unravel(f), xb[None], state=state)[0])(flat)  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(one))(x))


def per_example_grads(model, params, state, x, y, loss):
    """``(B, P)``: each example's gradient of ``loss`` on it alone."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    one = lambda xb, yb: jax.grad(lambda f: loss(model.apply(unravel(f), xb[None], state=state), yb[None]))(flat)  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(one))(x, y))


def kronecker_dense(kron, params):
    """The dense matrix of a ``fbp.laplace.Kronecker`` structure (``Q Λ Qᵀ`` per block, its diagonal
    elsewhere), on the flat params (every layer chosen) — built index by index, independently of
    the structure's own products."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    index = unravel(jnp.arange(flat.size, dtype=jnp.float64))
    m = np.diag(np.asarray(kron.diagonal))
    from fbp.curvature import block_matrix
    leaves = {}
    from fbp.walk import map_leaf_params
    map_leaf_params(kron.model, index, lambda path, layer, p: leaves.setdefault(path, p))
    for path, eig in kron.eigen.items():
        for block, (qa, qg, lam) in zip(kron.blocks[path], eig, strict=True):
            ind = np.asarray(block_matrix(leaves[path], block)).astype(int).ravel()
            q = np.kron(np.asarray(qa), np.asarray(qg))
            m[np.ix_(ind, ind)] = q @ np.diag(np.asarray(lam).ravel()) @ q.T
    return m
