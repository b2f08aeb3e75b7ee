r"""The linearised predictive's variances ``diag Σ_f(x) = diag(J P⁻¹ Jᵀ)`` from each layer's
inputs and output cotangents, without the output Jacobian ``J``.

For a Diagonal or Kronecker structure, ``P⁻¹`` is diagonal in a basis that factors over
layers, so the variance of output ``c`` of example ``b`` is a sum over layers and blocks:

.. math::  \operatorname{var}_{bc} = \sum_{\text{blocks}} \sum_{ij} W_{ij}\,(\tilde X_b^\top \tilde G_{bc})_{ij}^2,
           \qquad \tilde X_b = X_b Q_A,\ \tilde G_{bc} = G_{bc} Q_G,\ W_{ij} = \frac{1}{s Λ_{ij} + δ}

(``X_b: (T, rows)`` the block's inputs at its ``T`` positions, a column of ones for a bias,
``G_bc: (T, n_out)`` the cotangents of its products when output ``c`` is backpropagated;
``fbp.nn.positions``). For the diagonal structure (and the coordinates no Kronecker block
covers) ``Q = I`` and ``W = 1/(s d + δ)`` elementwise. At one position (a Dense layer) the
sum is ``Σ_j ((X̃_b²) W)_j G̃_bcj²``: two products of the layer's size, where the Jacobian
route writes ``C`` per-example gradients of every layer and rotates each
(``B·C·(rows²·n_out + rows·n_out²)`` for a Kronecker block, against ``B·(rows² + C·n_out²)``
here). With several positions the block's per-example gradients ``X̃_bᵀ G̃_bc`` are
materialised one layer at a time; a layer without positions (LayerNorm, an embedding) gives
its per-example gradients from its own rule. ``Laplace.predict`` uses this for the probit and
regression predictives; a Dense structure (``"full"``, ``"last_layer"``) keeps the Jacobian.

The work splits in two: ``prepare`` backpropagates the ``C`` outputs once and keeps the squares
that do not depend on ``s`` or ``δ`` (``X̃²`` and ``G̃²`` at one position, ``(X̃ᵀG̃)²`` otherwise);
``evaluate`` weighs them. Tuning ``δ`` on validation data (``optimize_prior(method="nll")``)
prepares once and evaluates once per candidate: one product of the layer's size each.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp.per_example import backward_columns
from fbp.walk import map_leaf_params


def _get(tree, key):
    for k in key if isinstance(key, tuple) else (key,):
        tree = tree[k]
    return tree


def _squares(x_parts, g, spec_of):
    """Terms for inputs ``x_parts`` (each ``(B, T, n_k)``, rows stacked in order) and cotangents
    ``g: (C, B, T, n_out)``: ``(spec_of(lo, hi), arrays)`` per part, the weights' rows ``lo:hi``."""
    out, offset = [], 0
    for part in x_parts:
        n = part.shape[-1]
        if part.shape[1] == 1:  # one position: (x²) W · g², no per-example gradient
            arrays = {"x2": jnp.square(part[:, 0]), "g2": jnp.square(g[:, :, 0])}
        else:
            arrays = {"sq": jnp.square(jnp.einsum("bti,cbtj->cbij", part, g))}
        out.append((spec_of(offset, offset + n), arrays))
        offset += n
    return out


def _block_rows(parts_of, block, ones):
    """The block's input rows: its kernels' parts in order, and a column of ones for its bias."""
    rows = [p for key, _ in block.kernels for p in parts_of[key]]
    return rows + [ones] if block.bias is not None else rows


def _layer_terms(path, found, layout, blocks):
    """One leaf layer's terms ``[(spec, arrays)]``; ``spec`` says which weights each one takes."""
    if "per" in found:  # no positions: its per-example gradients, (C, B, ...) per leaf
        leaves = jax.tree_util.tree_leaves(found["per"])
        return [(("leaf", path, i), {"sq": jnp.square(a)}) for i, a in enumerate(leaves)
                if jnp.issubdtype(a.dtype, jnp.inexact)]
    terms, covered = [], set()
    for (kernels, bias), parts, g in zip(layout, found["parts"], found["g"], strict=True):
        parts = [[p[0] for p in kernel_parts] for kernel_parts in parts]  # the same for every column
        parts_of = {key: kernel_parts for (key, _), kernel_parts in zip(kernels, parts, strict=True)}
        ones = jnp.ones((*g.shape[1:3], 1), g.dtype)
        for i, (block, qa, qg, _) in enumerate(blocks):
            if not ({key for key, _ in block.kernels} <= set(parts_of) and (block.bias is None or block.bias == bias)):
                continue
            rotated = jnp.concatenate(_block_rows(parts_of, block, ones), axis=-1) @ qa.astype(g.dtype)
            terms += _squares([rotated], g @ qg.astype(g.dtype), lambda lo, hi, i=i: ("block", path, i))
            covered |= {key for key, _ in block.kernels} | ({block.bias} if block.bias is not None else set())
        for (key, _), kernel_parts in zip(kernels, parts, strict=True):
            if key not in covered:
                terms += _squares(kernel_parts, g, lambda lo, hi, key=key: ("kernel", path, key, lo, hi))
        if bias is not None and bias not in covered:
            terms.append((("entry", path, bias), {"sq": jnp.square(g.sum(axis=2))}))
    terms += [(("entry", path, key), {"sq": jnp.square(per)}) for key, per in found["rest"].items()]
    return terms


def identity_columns(pred):
    """``(*pred.shape, C)``: one output cotangent per output unit, the identity's columns — what
    backpropagates each output's Jacobian row (the predictive's and ``prepare``'s columns).

    Args:
        pred: the model's outputs ``(..., C)``.

    Returns:
        The columns.
    """
    c = pred.shape[-1]
    return jnp.broadcast_to(jnp.eye(c, dtype=pred.dtype), (*pred.shape, c))


def prepare(model, params, state, x, hessian, space, specs: list):
    """``(f(x), arrays)``: the outputs and the squares ``evaluate`` weighs (module docstring).

    Args:
        model: the network (run in inference mode).
        params: the MAP params.
        state: its state, or ``None``.
        x: the inputs.
        hessian: a structure with ``variance_weights`` (``Diagonal``, ``Kronecker``).
        space: the posterior's ``Subspace`` (coordinates outside it have no variance).
        specs: filled (at trace time) with each array's weights, in order: ``evaluate`` reads it.

    Returns:
        The outputs ``(B, C)`` and a list of dicts of arrays, one per term.
    """
    pred, _, per, layouts, _ = backward_columns(model, params, x, identity_columns, mode="positions", state=state,
                                                train=False)
    _, blocks = hessian.variance_weights(1.0, 1.0)  # the bases only: the weights come in evaluate
    terms = [t for path, found in per.items() if path in space.groups
             for t in _layer_terms(path, found, layouts.get(path) or (), blocks.get(path, ()))]
    specs[:] = [spec for spec, _ in terms]
    return pred, [arrays for _, arrays in terms]


def evaluate(model, arrays, specs, hessian, space, s, delta):
    """``diag Σ_f`` from ``prepare``'s squares, weighed by ``P⁻¹`` at ``s, δ``.

    Args:
        model: the network.
        arrays: ``prepare``'s squares.
        specs: ``prepare``'s ``specs`` (which weights each square takes).
        hessian: the structure ``prepare`` was given.
        space: the posterior's ``Subspace``.
        s: the likelihood's scale.
        delta: the prior precision (a scalar or one per coordinate).

    Returns:
        The variances, ``(B, C)``.
    """
    diag, blocks = hessian.variance_weights(s, delta)
    trees = {}
    map_leaf_params(model, space.embed(diag), lambda path, layer, t: trees.setdefault(path, t))  # 0 outside

    def weights(spec, n_out):
        kind, path = spec[:2]
        if kind == "block":
            return blocks[path][spec[2]][3]
        if kind == "leaf":
            return jax.tree_util.tree_leaves(trees[path])[spec[2]]
        w = _get(trees[path], spec[2])  # a kernel's rows lo:hi as a (fan_in, n_out) matrix, or a whole entry
        return w if kind == "entry" else w.reshape(-1, n_out)[spec[3]:spec[4]]

    total = 0.0
    for spec, term in zip(specs, arrays, strict=True):
        last = term["g2"] if "x2" in term else term["sq"]
        w = weights(spec, last.shape[-1]).astype(last.dtype)
        if "x2" in term:
            total = total + jnp.einsum("bj,cbj->cb", term["x2"] @ w, term["g2"])
        else:
            sq = term["sq"]
            total = total + jnp.tensordot(sq, w, axes=w.ndim) if w.ndim else total + sq * w
    return jnp.transpose(total)


def variances(model, params, state, x, hessian, space, s, delta):
    """``prepare`` then ``evaluate``: the linearised predictive's outputs and variances.

    Args:
        model: the network (run in inference mode).
        params: the MAP params.
        state: its state, or ``None``.
        x: the inputs.
        hessian: a structure with ``variance_weights`` (``Diagonal``, ``Kronecker``).
        space: the posterior's ``Subspace``.
        s: the likelihood's scale.
        delta: the prior precision (a scalar or one per coordinate).

    Returns:
        ``(f(x), diag Σ_f(x))``, ``(B, C)`` each.
    """
    specs: list = []
    pred, arrays = prepare(model, params, state, x, hessian, space, specs)
    return pred, evaluate(model, arrays, specs, hessian, space, s, delta)


__all__ = ["evaluate", "identity_columns", "prepare", "variances"]
