"""``fbp.laplace.fit``: the curvature of a trained network over its training data, batch by
batch, as one of the structures of ``fbp.laplace.structures``, and the ``Laplace`` posterior."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, Loss, run_forward
from fbp.curvature import diag_ggn, kfac_factors
from fbp.laplace.posterior import Laplace, _chunks, likelihood_of, per_column_gradients
from fbp.laplace.structures import STRUCTURES, Dense, Diagonal, Kronecker
from fbp.subspace import leaf_paths, subspace
from fbp.validation import typed_arguments


def _data_term(loss_sum, likelihood, pred, y):
    value = loss_sum.forward(pred, y)[0]
    # MSE's per-example value is the mean over outputs: ½ Σ‖f − y‖² = (C/2) · Σ_n MSE_n
    return value * pred[0].size / 2 if likelihood == "regression" else value


def _slices(tree, lo, hi):
    return jax.tree_util.tree_map(lambda a: a[lo:hi], tree)


@functools.lru_cache(maxsize=32)
def _batch_function(model, loss_sum, structure, space, has_state, approximation):
    """One batch's curvature and data term, jitted once per (model, loss, structure, subspace, …):
    a second fit of the same model and shapes reuses the compiled function."""
    likelihood = likelihood_of(loss_sum)

    def term(params, state, xb, yb):
        pred = run_forward(model, params, xb, **({} if state is None else {"state": state}))[0]
        return _data_term(loss_sum, likelihood, pred, yb)

    def run(params, state, xb, yb):
        args = (params, state) if has_state else (params,)
        if structure == "diag":
            return space.restrict(diag_ggn(model, loss_sum, has_state=has_state)(*args, xb, yb)), \
                term(params, state, xb, yb)
        if structure in ("kfac", "ekfac"):
            factors = kfac_factors(model, loss_sum, approximation=approximation, has_state=has_state)
            return factors(*args, xb, yb), term(params, state, xb, yb)
        _, tree = per_column_gradients(model, params, xb, lambda p: loss_sum.hessian_factor(p, yb), state)
        rows = jax.vmap(jax.vmap(space.restrict))(tree).reshape(-1, space.dim)
        return rows.T @ rows, term(params, state, xb, yb)

    return jax.jit(run)


def curvature_of(model: Layer, loss: Loss, params, x, y, *, structure: str, space, state=None, batch_size: int = 256,
                 approximation: str = "expand", separate_bias: bool = False):
    """The likelihood's curvature ``H`` over the data as a structure, batch by batch.

    Args:
        model: the network (inference mode).
        loss: the loss (``likelihood_of``); its sum over the data is differentiated.
        params: the params.
        x: the inputs.
        y: the targets.
        structure: ``"diag"``, ``"kfac"``, ``"ekfac"`` or ``"full"``.
        space: the ``fbp.subspace.Subspace``.
        state: the model state, or ``None``.
        batch_size: examples per compiled batch.
        approximation: K-FAC's ``"expand"`` or ``"reduce"``.
        separate_bias: ``"kfac"``/``"ekfac"``: a bias block of its own (``Kronecker.of``).

    Returns:
        ``(H, data_term, n_outputs)``: the structure (scaled to the Gaussian likelihood for
        regression), ``Σ_n CE_n`` or ``½ Σ_n ‖f_n − y_n‖²``, and the outputs per example.
    """
    likelihood = likelihood_of(loss)
    loss_sum = dataclasses.replace(loss, reduction="sum")
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    if n == 0:
        raise InputError("fbp.laplace", "no training examples")
    context = {} if state is None else {"state": state}
    compiled = _batch_function(model, loss_sum, structure, space, state is not None, approximation)
    batch = lambda xb, yb: compiled(params, state, xb, yb)  # noqa: E731
    total, value = None, 0.0
    for lo, hi in _chunks(n, batch_size):
        got, v = batch(_slices(x, lo, hi), _slices(y, lo, hi))
        value = value + v
        if structure in ("kfac", "ekfac"):  # A is each batch's mean: weight it by the batch's share
            got = {path: f._replace(blocks=[dataclasses.replace(b, A=b.A * (hi - lo) / n) for b in f.blocks])
                   for path, f in got.items()}
        total = got if total is None else jax.tree_util.tree_map(jnp.add, total, got)
    n_outputs = int(jax.eval_shape(lambda a: run_forward(model, params, a, **context)[0], _slices(x, 0, 1)).size)
    scale = n_outputs / 2 if likelihood == "regression" else 1.0  # GGN(Σ MSE_n) = (2/C) JᵀJ
    if structure == "diag":
        found = Diagonal(total * scale)
    elif structure in ("kfac", "ekfac"):
        total = {path: f._replace(blocks=[dataclasses.replace(b, G=b.G * scale) for b in f.blocks],
                                  diagonal=jax.tree_util.tree_map(lambda d: d * scale, f.diagonal))
                 for path, f in total.items()}
        found = Kronecker.of(total, model, params, space, separate_bias)
        if structure == "ekfac":
            found = _refit(found, model, loss_sum, params, x, y, state, batch_size, scale)
    else:
        found = Dense.of((total + total.T) / 2 * scale)
    return found, value, n_outputs


@functools.lru_cache(maxsize=32)
def _refit_function(model, loss_sum, space, has_state):
    def run(kron, params, state, xb, yb):
        _, tree = per_column_gradients(model, params, xb, lambda p: loss_sum.hessian_factor(p, yb), state)
        rotated = jax.vmap(jax.vmap(kron.rotate))(tree)
        return jax.tree_util.tree_map(lambda r: jnp.sum(jnp.square(r), axis=(0, 1)), rotated)

    return jax.jit(run)


def _refit(kron: Kronecker, model, loss_sum, params, x, y, state, batch_size, scale) -> Kronecker:
    """EK-FAC: ``Λ = Σ_{n,m} (Q_Aᵀ R_nm Q_G)²`` in K-FAC's eigenbases (``structures``)."""
    batch = _refit_function(model, loss_sum, kron.space, state is not None)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    total = None
    for lo, hi in _chunks(n, batch_size):
        got = batch(kron, params, state, _slices(x, lo, hi), _slices(y, lo, hi))
        total = got if total is None else jax.tree_util.tree_map(jnp.add, total, got)
    return kron.with_eigenvalues(jax.tree_util.tree_map(lambda t: t * scale, total))


@typed_arguments
def fit(model: Layer, loss: Loss, params, x, y, *, structure: str = "kfac", layers=None, state=None,
        prior_precision=1.0, sigma_noise: float = 1.0, temperature: float = 1.0, batch_size: int = 256,
        approximation: str = "expand", separate_bias: bool = False) -> Laplace:
    """The Laplace approximation around trained ``params`` (``fbp.laplace.posterior``).

    Args:
        model: the trained network (run in inference mode: BatchNorm's running statistics).
        loss: the training loss, a negative log-likelihood: ``CategoricalCrossEntropy(from_logits=True)``,
            ``BinaryCrossEntropy(from_logits=True)`` or ``MSE``.
        params: the MAP estimate.
        x: the training inputs.
        y: the training targets.
        structure: ``"diag"``, ``"kfac"``, ``"ekfac"``, ``"full"`` (the dense GGN: small models or
            few layers) or ``"last_layer"`` (``"full"`` on the last layer with parameters).
        layers: the layers the posterior covers (leaf paths; ``None``: all), the others fixed at ``params``.
        state: the model's state, or ``None``.
        prior_precision: the initial ``δ`` (a scalar, or one per layer).
        sigma_noise: the initial ``σ`` (regression).
        temperature: ``T``.
        batch_size: examples per compiled batch.
        approximation: K-FAC's ``"expand"`` or ``"reduce"`` for weights shared over positions.
        separate_bias: ``"kfac"``/``"ekfac"``: give each bias a Kronecker block of its own,
            dropping the weight-bias cross terms (laplace-torch's convention). By default a
            layer's weights and bias form one block ``[W; b]``, which keeps them.

    Returns:
        A ``Laplace``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"fbp.laplace.fit: structure must be one of {STRUCTURES}, got {structure!r}")
    if batch_size < 1:
        raise ValueError(f"fbp.laplace.fit: batch_size must be at least 1, got {batch_size}")
    likelihood = likelihood_of(loss)
    if structure == "last_layer":
        if layers is not None:
            raise ValueError("fbp.laplace.fit: structure='last_layer' chooses its layer; pass layers=... with "
                             "structure='full' instead")
        layers = leaf_paths(model, params)[-1:]
    space = subspace(model, params, layers)
    hessian, term, n_outputs = curvature_of(model, loss, params, x, y, space=space, state=state,
                                            structure="full" if structure == "last_layer" else structure,
                                            batch_size=batch_size, approximation=approximation,
                                            separate_bias=separate_bias)
    dtype = space.restrict(params).dtype
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    return Laplace(model, loss, likelihood, params, state, space, hessian, structure,
                   jnp.asarray(prior_precision, dtype), jnp.asarray(sigma_noise, dtype), float(temperature), n,
                   n_outputs, jnp.asarray(term, dtype))


__all__ = ["curvature_of", "fit"]
