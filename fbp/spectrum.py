r"""The curvature spectrum of a trained (or training) network from matrix-vector products only:
top eigenvalues, the trace and the spectral density, of the whole model or of one layer.

The matrix is the loss's **GGN** ``G = Jᵀ H J`` (positive semi-definite; ``J v`` from the layers'
tangent rules, ``fbp.linear_pass``, ``Jᵀu`` from their backward), or with
``curvature="hessian"`` the **Hessian** of the loss in the parameters (indefinite; products from
the layers' hand-written second-order rules, ``fbp.second_order``: Dense, convolutions,
activations, pooling and shape layers, normalisations, Dropout, Embedding and the combinators —
a model with another layer is refused, naming it). ``layer="…"`` restricts either to one layer's
block ``P A P`` (``fbp.subspace``).

* **Top eigenvalues** (``eigenvalues``): Lanczos with full reorthogonalisation (``fbp.lanczos``);
  each Ritz value comes with its residual bound ``‖A y − θ y‖`` (an eigenvalue lies within it).
* **Trace** (``trace``): Hutchinson's ``tr A ≈ (1/M) Σ_m z_mᵀ A z_m`` with Rademacher ``z_m``
  (Hutchinson, 1989), with its standard error.
* **Spectral density** (``density``): stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao,
  2019; Lin, Saad & Yang, 2016): ``runs`` Lanczos runs of ``k`` steps from random unit vectors;
  each run's Ritz values ``θ_i`` with weights ``u_{1,i}²`` is a Gauss quadrature of the spectral
  measure, exact for the moments ``zᵀ A^p z`` with ``p ≤ 2k − 1``; the density is their
  average, smoothed by a Gaussian of width ``σ`` for plotting.

The iterations run on the chosen params arrays themselves (``Operator.leaf_matvec``; the
products take and return params-shaped trees), not on one flat vector: flattening every
product's result and slicing every direction back would copy all ``dim`` entries twice a step.

Data larger than one batch: ``batch_size`` splits ``x, y`` into equal batches and sums (or, for
``reduction="mean"``, averages) each product over them in a ``lax.map`` — the curvature of the
whole set, batch by batch, as PyHessian does.

Use it under ``jax.jit`` by building the operator inside the jitted function::

    top = jax.jit(lambda p: fbp.spectrum.eigenvalues(fbp.spectrum.operator(model, loss, p, x, y), k=5))(params)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp import second_order
from fbp.core import InputError, Layer, Loss, run_forward
from fbp.curvature import _require_curvature, ggn_product_of_pass
from fbp.lanczos import _dot, lanczos, rademacher
from fbp.linear_pass import LinearPass
from fbp.subspace import Subspace, subspace
from fbp.validation import typed_arguments

CURVATURES = ("ggn", "hessian")


class Operator(NamedTuple):
    """A symmetric curvature matrix given by its products on flat vectors of the chosen coordinates.

    Attributes:
        matvec: ``v -> A v`` on ``(dim,)`` vectors.
        dim: the dimension.
        dtype: the vectors' dtype.
        space: the ``fbp.subspace.Subspace`` (``space.embed(v)`` gives the params-shaped direction).
        leaf_matvec: the same products on the chosen params arrays (a list in ``space.select``'s
            order), without flattening: what ``eigenvalues``, ``trace`` and ``density`` iterate on
            (``None``: they use ``matvec``).
    """

    matvec: Callable
    dim: int
    dtype: Any
    space: Subspace
    leaf_matvec: Callable | None = None


def _batches(x, y, batch_size):
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    if batch_size is None or batch_size >= n:
        return None
    if n % batch_size:
        raise InputError("fbp.spectrum.operator", f"batch_size={batch_size} must divide the {n} examples (the "
                                                  f"curvature of the set is the sum over equal batches); pass a "
                                                  f"divisor of {n} or trim the data")
    split = lambda a: a.reshape(n // batch_size, batch_size, *a.shape[1:])  # noqa: E731
    return jax.tree_util.tree_map(split, x), jax.tree_util.tree_map(split, y)


@typed_arguments
def operator(model: Layer, loss: Loss, params, x, y, *, curvature: str = "ggn", layer=None, state=None, key=None,
             train: bool = False, batch_size: int | None = None) -> Operator:
    """The curvature operator of ``loss(model(params, x), y)`` (module docstring).

    Args:
        model: the network.
        loss: a ``fbp.losses`` loss (its reduction scales the matrix).
        params: the params.
        x: the inputs.
        y: the targets.
        curvature: ``"ggn"`` or ``"hessian"`` (module docstring).
        layer: ``None`` (every parameter), a leaf path (``"2"``) or a list of paths: the block.
        state: the model's state (BatchNorm), or ``None``.
        key: a random key for layers that need one.
        train: run the model in training mode (Dropout masks from ``key``, BatchNorm's batch statistics).
        batch_size: split the data into batches of this size (it must divide the number of examples).

    Returns:
        An ``Operator``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"fbp.spectrum.operator: curvature must be one of {CURVATURES}, got {curvature!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"fbp.spectrum.operator: batch_size must be at least 1 (or None: one batch), got {batch_size}")
    _require_curvature(loss, "fbp.spectrum.operator")
    if curvature == "hessian":
        second_order.require(model, "fbp.spectrum.operator(curvature='hessian')")
    space = subspace(model, params, layer)
    leaves = jax.tree_util.tree_leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32

    def on_pass(xb, yb):
        """``v_tree -> A v_tree`` on one forward of the batch ``xb`` (its residuals shared)."""
        pred, res = run_forward(model, params, xb, state=state, key=key, train=train)
        if curvature == "ggn":
            linear = LinearPass(model, res, pred)
            return lambda v_tree: ggn_product_of_pass(linear, pred, loss, yb, v_tree)
        loss_res = loss.forward(pred, yb)[1]
        return lambda v_tree: second_order.hessian_product_of_pass(model, res, pred, loss, loss_res, yb, v_tree)

    batches = _batches(x, y, batch_size)
    if batches is None:  # one forward for every product: the residuals are shared
        whole = on_pass(x, y)
        product = lambda into, out_of: lambda v: out_of(whole(into(v)))  # noqa: E731
    else:
        mean = getattr(loss, "reduction", "mean") == "mean"

        def product(into, out_of):
            def matvec(v):
                v_tree = into(v)
                each = lax.map(lambda b: out_of(on_pass(b[0], b[1])(v_tree)), batches)
                return jax.tree_util.tree_map(lambda a: a.mean(axis=0) if mean else a.sum(axis=0), each)
            return matvec

    uniform = space.positions is not None and all(jnp.dtype(s.dtype) == dtype for s in space.like())
    return Operator(product(space.embed, space.restrict), space.dim, dtype, space,
                    product(space.place, space.select) if uniform else None)


def _lanczos(op: Operator, steps: int, key, start=None, reorthogonalize: bool = True):
    """``fbp.lanczos.lanczos`` on the operator's params arrays where it can (no flat copies),
    with a function taking the basis' combinations to flat ``(m, dim)`` rows."""
    if op.leaf_matvec is None:
        return lanczos(op.matvec, op.dim, steps, key, op.dtype, start, reorthogonalize), lambda rows: rows
    return (lanczos(op.leaf_matvec, op.dim, steps, key, op.dtype, start, reorthogonalize, like=op.space.like()),
            op.space.rows)


class Eigen(NamedTuple):
    """``eigenvalues``' result: ``values (k,)`` descending, their ``residuals (k,)`` (each
    eigenvalue of the operator lies within that distance of a Ritz value; 0 when the iteration
    stopped at an invariant subspace, the residual having fallen to rounding), and the Ritz
    ``vectors (k, dim)`` (unit length; ``space.embed`` makes them params-shaped; ``None``
    without reorthogonalisation, which keeps no basis)."""

    values: jax.Array
    residuals: jax.Array
    vectors: jax.Array


def _key(key):
    return jax.random.key(0) if key is None else key


@typed_arguments
def eigenvalues(op: Operator, k: int = 1, *, iterations: int | None = None, key=None,
                reorthogonalize: bool = True) -> Eigen:
    """The ``k`` largest eigenvalues by Lanczos (one product per step).

    Args:
        op: the ``Operator``.
        k: how many.
        iterations: Lanczos steps (default ``max(3k, 20)``, at most ``dim``).
        key: the start vector's key.
        reorthogonalize: full reorthogonalisation (``fbp.lanczos``); ``False`` for large models,
            where reading the basis twice a step costs more than the product (the top values
            still converge; copies of converged ones may appear further down).

    Returns:
        An ``Eigen``; compare ``residuals`` with the gaps to judge convergence.
    """
    k = int(k)
    if not 1 <= k <= op.dim:
        raise ValueError(f"fbp.spectrum.eigenvalues: k must be in [1, {op.dim}], got {k}")
    steps = min(op.dim, max(3 * k, 20) if iterations is None else int(iterations))
    if steps < k:
        raise ValueError(f"fbp.spectrum.eigenvalues: {steps} iterations cannot give k={k} eigenvalues")
    t, rows = _lanczos(op, steps, _key(key), reorthogonalize=reorthogonalize)
    values, vectors, residuals = t.ritz()
    order = jnp.argsort(-values)[:k]
    ritz = None if t.basis is None else rows(t.combine(vectors[:, order]))
    return Eigen(values[order], residuals[order], ritz)


class Trace(NamedTuple):
    """``trace``' result: the ``estimate`` and its ``stderr``."""

    estimate: jax.Array
    stderr: jax.Array


@typed_arguments
def trace(op: Operator, samples: int = 100, *, key=None) -> Trace:
    """Hutchinson's trace estimate.

    Args:
        op: the ``Operator``.
        samples: Rademacher vectors (one product each; at least 2).
        key: their key.

    Returns:
        A ``Trace``.
    """
    if int(samples) < 2:
        raise ValueError(f"fbp.spectrum.trace: samples must be at least 2 (for the standard error), got {samples}")
    if op.leaf_matvec is None:
        matvec, like = op.matvec, jax.ShapeDtypeStruct((op.dim,), op.dtype)
    else:
        matvec, like = op.leaf_matvec, op.space.like()

    def quadratic(k):  # one sample drawn inside the loop: no (samples, dim) array of signs
        z = rademacher(k, like)
        return _dot(z, matvec(z), op.dtype)

    quad = lax.map(quadratic, jax.random.split(_key(key), int(samples)))
    return Trace(jnp.mean(quad), jnp.std(quad, ddof=1) / math.sqrt(int(samples)))


class Density(NamedTuple):
    """``density``' result: per run, the quadrature ``nodes (runs, k)`` and ``weights (runs, k)``
    (each run's weights sum to 1), and the operator's ``dim``."""

    nodes: jax.Array
    weights: jax.Array
    dim: int

    def moments(self, p: int) -> jax.Array:
        """``tr(A^p) / dim`` estimated: the runs' mean of ``Σ_i w_i θ_i^p``."""
        return jnp.mean(jnp.sum(self.weights * self.nodes ** p, axis=1))

    def evaluate(self, grid, sigma: float | None = None) -> jax.Array:
        """The density on ``grid``, smoothed with a Gaussian of width ``sigma`` (default: 1 % of
        the nodes' range); it integrates to 1 (eigenvalues per unit, divided by ``dim``)."""
        grid = jnp.asarray(grid)
        if sigma is None:
            sigma = 0.01 * (jnp.max(self.nodes) - jnp.min(self.nodes)) + 1e-12
        gap = (grid[:, None, None] - self.nodes[None]) / sigma
        kernel = jnp.exp(-0.5 * gap ** 2) / (sigma * math.sqrt(2 * math.pi))
        return jnp.mean(jnp.sum(self.weights[None] * kernel, axis=2), axis=1)


@typed_arguments
def density(op: Operator, iterations: int = 80, runs: int = 10, *, key=None, reorthogonalize: bool = True) -> Density:
    """The spectral density by stochastic Lanczos quadrature (module docstring).

    Args:
        op: the ``Operator``.
        iterations: Lanczos steps per run.
        runs: random start vectors (``runs × iterations`` products in all).
        key: their key.
        reorthogonalize: full reorthogonalisation (``fbp.lanczos``; without it the quadrature
            stays a good approximation of the density, but is no longer exact for the moments).

    Returns:
        A ``Density``.
    """
    if iterations < 1 or runs < 1:
        raise ValueError(f"fbp.spectrum.density: iterations and runs must be at least 1, got iterations={iterations}, "
                         f"runs={runs}")
    steps = min(op.dim, int(iterations))

    def one(k):  # each run from its own Rademacher start (fbp.lanczos draws one from the key)
        return _lanczos(op, steps, k, reorthogonalize=reorthogonalize)[0].quadrature()

    nodes, weights = lax.map(one, jax.random.split(_key(key), int(runs)))
    return Density(nodes, weights, op.dim)


def plot_density(result: Density, ax=None, *, points: int = 500, sigma: float | None = None, log: bool = True):
    """Plot the smoothed density (``matplotlib``).

    Args:
        result: a ``Density``.
        ax: the axes, or ``None`` for a new figure.
        points: grid points.
        sigma: the smoothing width (``Density.evaluate``).
        log: a log scale (the spectra of trained networks span orders of magnitude near 0).

    Returns:
        The axes.
    """
    import matplotlib.pyplot as plt  # optional: the `examples` and `diagnostics` extras
    import numpy as np

    ax = plt.subplots(figsize=(6, 3.5))[1] if ax is None else ax
    lo, hi = float(jnp.min(result.nodes)), float(jnp.max(result.nodes))
    pad = 0.05 * (hi - lo) + 1e-12
    grid = np.linspace(lo - pad, hi + pad, points)
    values = np.asarray(result.evaluate(grid, sigma))
    ax.plot(grid, np.maximum(values, 1e-12) if log else values)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax


__all__ = ["CURVATURES", "Density", "Eigen", "Operator", "Trace", "density", "eigenvalues", "operator",
           "plot_density", "trace"]
