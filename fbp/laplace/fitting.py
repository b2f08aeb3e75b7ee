"""``fbp.laplace.fit``: the curvature of a trained network over its training data, batch by
batch, as one of the structures of ``fbp.laplace.structures``, and the ``Laplace`` posterior."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, Loss, run_forward
from fbp.curvature import diag_ggn, kfac_factors
from fbp.laplace.posterior import Laplace, _chunks, likelihood_of
from fbp.laplace.structures import STRUCTURES, Dense, Diagonal, Kronecker
from fbp.per_example import backward_columns
from fbp.subspace import leaf_paths, subspace
from fbp.walk import map_leaf_params


def _data_term(loss_sum, likelihood, pred, y):
    value = loss_sum.forward(pred, y)[0]
    # MSE's per-example value is the mean over outputs: ½ Σ‖f − y‖² = (C/2) · Σ_n MSE_n
    return value * pred[0].size / 2 if likelihood == "regression" else value


def _dense_rows(model, loss_sum, params, x, y, space, state):
    """``H`` of one batch on the subspace, from the per-example gradients of the loss's factor columns."""
    pred, _, per, _, _ = backward_columns(model, params, x, lambda p: loss_sum.hessian_factor(p, y), mode="grads",
                                          state=state, train=False)
    m, n = next(iter(jax.tree_util.tree_leaves(per))).shape[:2] if per else (0, 0)

    def leaf(path, layer, p):
        return per[path] if path in per else jax.tree_util.tree_map(lambda a: jnp.zeros((m, n, *a.shape), a.dtype), p)

    rows = jax.vmap(jax.vmap(space.restrict))(map_leaf_params(model, params, leaf)).reshape(m * n, space.dim)
    return pred, rows.T @ rows


def fit(model: Layer, loss: Loss, params, x, y, *, structure: str = "kfac", layers=None, state=None,
        prior_precision=1.0, sigma_noise: float = 1.0, temperature: float = 1.0, batch_size: int = 256,
        approximation: str = "expand") -> Laplace:
    """The Laplace approximation around trained ``params`` (``fbp.laplace.posterior``).

    Args:
        model: the trained network (run in inference mode: BatchNorm's running statistics).
        loss: the training loss, a negative log-likelihood: ``CategoricalCrossEntropy(from_logits=True)``,
            ``BinaryCrossEntropy(from_logits=True)`` or ``MSE``.
        params: the MAP estimate.
        x: the training inputs.
        y: the training targets.
        structure: ``"diag"``, ``"kfac"``, ``"full"`` (the dense GGN: small models or few layers)
            or ``"last_layer"`` (``"full"`` on the last layer with parameters).
        layers: the layers the posterior covers (leaf paths; ``None``: all), the others fixed at ``params``.
        state: the model's state, or ``None``.
        prior_precision: the initial ``δ`` (a scalar, or one per layer).
        sigma_noise: the initial ``σ`` (regression).
        temperature: ``T``.
        batch_size: examples per compiled batch.
        approximation: K-FAC's ``"expand"`` or ``"reduce"`` for weights shared over positions.

    Returns:
        A ``Laplace``.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"fbp.laplace.fit: structure must be one of {STRUCTURES}, got {structure!r}")
    likelihood = likelihood_of(loss)
    if structure == "last_layer":
        if layers is not None:
            raise ValueError("fbp.laplace.fit: structure='last_layer' chooses its layer; pass layers=... with "
                             "structure='full' instead")
        layers = leaf_paths(model, params)[-1:]
    space = subspace(model, params, layers)
    loss_sum = dataclasses.replace(loss, reduction="sum")
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    if n == 0:
        raise InputError("fbp.laplace.fit", "no training examples")
    context = {} if state is None else {"state": state}
    has_state = state is not None
    args = (params, state) if has_state else (params,)
    scale = 1.0

    if structure == "diag":
        curvature = diag_ggn(model, loss_sum, has_state=has_state)
        batch = jax.jit(lambda xb, yb: (curvature(*args, xb, yb), _forward_term(xb, yb)))
    elif structure == "kfac":
        curvature = kfac_factors(model, loss_sum, approximation=approximation, has_state=has_state)
        batch = jax.jit(lambda xb, yb: (curvature(*args, xb, yb), _forward_term(xb, yb)))
    else:
        def dense(xb, yb):
            pred, h = _dense_rows(model, loss_sum, params, xb, yb, space, state)
            return h, _data_term(loss_sum, likelihood, pred, yb)
        batch = jax.jit(dense)

    def _forward_term(xb, yb):
        pred = run_forward(model, params, xb, **context)[0]
        return _data_term(loss_sum, likelihood, pred, yb)

    total, term, n_outputs = None, 0.0, None
    for lo, hi in _chunks(n, batch_size):
        xb = jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], x)
        yb = jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], y)
        got, value = batch(xb, yb)
        term = term + value
        if structure == "kfac":  # A is each batch's mean: weight it by the batch's share; G and the diagonal add
            got = {path: f._replace(blocks=[dataclasses.replace(b, A=b.A * (hi - lo) / n) for b in f.blocks])
                   for path, f in got.items()}
        total = got if total is None else jax.tree_util.tree_map(jnp.add, total, got)
    if n_outputs is None:
        n_outputs = int(jax.eval_shape(lambda a: run_forward(model, params, a, **context)[0],
                                       jax.tree_util.tree_map(lambda a: a[:1], x)).size)
    if likelihood == "regression":
        scale = n_outputs / 2  # the GGN of Σ MSE_n is (2/C) JᵀJ; the Gaussian likelihood's is JᵀJ/σ²
    if structure == "diag":
        hessian = Diagonal(space.restrict(total) * scale)
    elif structure == "kfac":
        total = {path: f._replace(blocks=[dataclasses.replace(b, G=b.G * scale) for b in f.blocks],
                                  diagonal=jax.tree_util.tree_map(lambda d: d * scale, f.diagonal))
                 for path, f in total.items()}
        hessian = Kronecker.of(total, model, params, space)
    else:
        hessian = Dense.of(total * scale)
    dtype = space.restrict(params).dtype
    return Laplace(model, loss, likelihood, params, state, space, hessian, structure,
                   jnp.asarray(prior_precision, dtype), jnp.asarray(sigma_noise, dtype), float(temperature), n,
                   n_outputs, jnp.asarray(term, dtype))


__all__ = ["fit"]
