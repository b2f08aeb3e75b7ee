"""The diagonal of the Hessian (not the GGN), backpropagated through a chain of layers with
each layer's second derivative (``fbp.curvature.diag_hessian``; split from ``fbp.curvature``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, Loss, map_leaf_params, run_forward
from fbp.probes import sum_squares_probe


def _chain(model: Layer, prefix: str = "") -> list[tuple[str, Layer]]:
    """The leaves of nested ``Serial`` s in order, or an error naming the first layer that is not
    a chain or has no second-order rule."""
    if model.chain:
        return [leaf for name, child in model.children().items()
                for leaf in _chain(child, f"{prefix}/{name}" if prefix else name)]
    if model.children():
        raise InputError(repr(model), "fbp.curvature.diag_hessian backpropagates the Hessian through a chain of "
                                      "layers (Serial); this one branches. Use diag_ggn, or ggn_vector_product",
                         path=tuple(prefix.split("/")) if prefix else ())
    if not (model.piecewise_linear or callable(getattr(model, "second_derivative", None))):
        raise InputError(repr(model), "fbp.curvature.diag_hessian needs each layer's second derivative: this layer "
                                      "has neither second_derivative(res) nor piecewise_linear = True (layers "
                                      "that mix their inputs non-linearly — norms, attention, recurrent cells, "
                                      "softmax — are not covered). Use diag_ggn",
                         path=tuple(prefix.split("/")) if prefix else ())
    return [(prefix, model)]


def _new_columns(r):
    """Columns ``√max(±r_k, 0) e_k`` for every unit ``k`` of ``r: (N, ...)``, with their signs."""
    n, units = r.shape[0], math.prod(r.shape[1:])
    eye = jnp.eye(units, dtype=r.dtype)[:, None, :]
    pos = (eye * jnp.sqrt(jnp.maximum(r, 0)).reshape(n, units)).reshape(units, *r.shape)
    neg = (eye * jnp.sqrt(jnp.maximum(-r, 0)).reshape(n, units)).reshape(units, *r.shape)
    return jnp.concatenate([pos, neg]), jnp.concatenate([jnp.ones(units, r.dtype), -jnp.ones(units, r.dtype)])


def diag_hessian(model: Layer, loss: Loss) -> Callable:
    """The exact diagonal of the Hessian of the loss, for chains of Dense, convolution, pooling,
    shape layers and elementwise activations (BackPACK's DiagHessian).

    The Hessian is the GGN plus, at every activation ``y = f(z)`` with output gradient ``g``,
    the term ``Σ_k g_k f''(z_k) ∇z_k ∇z_kᵀ``. Backpropagation carries the signed factor columns
    of both: the loss's ``S`` from the top, and at each activation ``√max(±g f''(z), 0) e_k``
    (one column per unit and sign) joining below it; each layer sums the signed squares of its
    per-example gradients over the columns it receives. Costs grow with the activations' sizes
    (two columns per unit): meant for small networks and for checking approximations.

    Args:
        model: a ``Serial`` chain (nested chains allowed) of layers with ``second_derivative``
            or ``piecewise_linear`` (the error names the first that has neither).
        loss: a ``fbp.losses`` loss.

    Returns:
        ``f(params, x, y) -> diag``, shaped like ``params`` (evaluation mode).
    """
    from fbp.curvature import _leaf_params, _require_curvature  # the module that re-exports this one

    _require_curvature(loss, "fbp.curvature.diag_hessian")
    chain = _chain(model)
    probes = [(path, layer, sum_squares_probe(layer, path)) for path, layer in chain]

    def f(params, x, y):
        h, saved = x, []
        for path, _, probe in probes:
            h, res = run_forward(probe, (_leaf_params(model, params, path), None), h, train=False)
            saved.append(res)
        value_res = loss.forward(h, y)[1]
        g = loss.backward(value_res, 1.0)
        cols = jnp.moveaxis(loss.hessian_factor(h, y), -1, 0)
        signs = jnp.ones(cols.shape[0], h.dtype)
        out = {}
        for (path, layer, probe), res in zip(reversed(probes), reversed(saved), strict=True):
            r = layer.second_derivative(res[0]) * g if not layer.piecewise_linear else None
            (_, _), g = probe.backward(res, g)
            (_, squares), cols = jax.vmap(probe.backward, in_axes=(None, 0))(res, cols)
            if squares is not None:
                out[path] = jax.tree_util.tree_map(functools.partial(jnp.tensordot, signs, axes=1), squares)
            if r is not None:
                new, new_signs = _new_columns(r)
                cols, signs = jnp.concatenate([cols, new]), jnp.concatenate([signs, new_signs])

        def leaf(path, layer, p):
            return out[path] if path in out else jax.tree_util.tree_map(jnp.zeros_like, p)

        return map_leaf_params(model, params, leaf)

    return f
