"""The per-example probe: a leaf layer whose backward returns, beside its gradient, what
``fbp.per_example`` (and ``fbp.privacy``, ``fbp.curvature``) read from it.

A probe's params are ``(params, None)``; its backward returns ``((d_params, per), d_x)``, so
the per-example quantity ``per`` travels out through the gradient pytree and nothing else in
the backward transform changes. Which quantity depends on the mode (``MODES``); how each
layer computes it — positions and Gram matrices, the embedding's scatter, or the layer's own
rules on each example alone — is described in ``fbp.per_example``'s module docstring.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fbp import independence
from fbp.core import InputError, Layer, Wrapper, children, map_leaf_params, run_forward, transform_layers
from fbp.linear_pass import tangent
from fbp.nn.positions import assemble, sq_norm

MODES = ("grads", "norms", "clip", "sgs", "sgs-columns", "kfac-expand", "kfac-reduce", "project", "positions")
# "sgs-columns": "sgs" inside a backward vmapped over columns, summed after by ``sum_columns``


def _has_params(params) -> bool:
    return any(jnp.issubdtype(a.dtype, jnp.inexact) for a in jax.tree_util.tree_leaves(params))


def _batched(d_y):
    return jax.tree_util.tree_leaves(d_y)[0].shape[0]


# --------------------------------------------------------------------------- per-layer rules
def _layer_positions(layer: Layer, res, d_y):
    """``(groups, rest)``: the layer's weights used like a Dense over positions (a list of
    ``Positions``) and its other per-example gradients (``{key: (B, ...)}``), from the layer's
    own ``per_example_positions(res, d_y)`` rule (declared beside its backward); ``None`` if it
    has none or declines for this configuration."""
    own = getattr(layer, "per_example_positions", None)
    return own(res, d_y) if callable(own) else None


def _sum_squares(per):
    return jax.tree_util.tree_map(lambda a: jnp.sum(jnp.square(a), axis=0), per)


def _covers(params, groups, rest) -> bool:
    keys = {k for g in groups for k, _, _ in g.kernels} | {g.bias for g in groups if g.bias} | set(rest)
    return len(keys) == sum(jnp.issubdtype(a.dtype, jnp.inexact) for a in jax.tree_util.tree_leaves(params))


def _fallback_grads(layer: Layer, params, x, d_y, context):
    """The layer's own forward and backward on each example alone (a batch of one)."""

    def one(x_b, d_y_b):
        add = lambda a: a[None]  # noqa: E731
        _, res = run_forward(layer, params, jax.tree_util.tree_map(add, x_b), **context)
        return layer.backward(res, jax.tree_util.tree_map(add, d_y_b))[0]

    return jax.vmap(one)(x, d_y)


# --------------------------------------------------------------------------- the probe
@dataclasses.dataclass(frozen=True, eq=False)
class _PerExample(Wrapper):
    """``layer`` with per-example quantities returned beside its gradient (through d_params)."""

    layer: Layer
    path: str
    mode: str | tuple
    choices: dict = dataclasses.field(default_factory=dict)  # path -> method, filled at trace time
    hooks: tuple = ()  # extensions that read every leaf's output and cotangents (fbp.extensions, needs "layer")
    check: bool = True  # refuse a layer that mixes the examples of a batch

    def forward(self, params, x, *, state=None, key=None, train=False):
        inner_params, _ = params
        if self.check:
            independence.require(self.layer, x, train=train, caller="per-example quantities")  # path: at_path
        context = {"state": state, "key": key, "train": train} if self.layer.contextual else {}
        y, res = run_forward(self.layer, inner_params, x, **context)
        seen = tuple(hook.from_output(y) for hook in self.hooks)
        return y, (res, inner_params, x, context, seen)

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): the wrapped layer's tangent (the probe's params are ``(p, None)``)."""
        return tangent(self.layer, res[0], d_params[0], d_x)

    def backward(self, res, d_y):
        inner, params, x, context, seen = res
        d_params, d_x = self.layer.backward(inner, d_y)
        layer_parts = {hook.name: hook.from_backward(part, d_y, d_x, d_params, params)
                       for hook, part in zip(self.hooks, seen, strict=False)}  # a column probe has none
        if not _has_params(params) or not self.mode:
            return (d_params, {"layer": layer_parts} if self.hooks else None), d_x
        found = _layer_positions(self.layer, inner, d_y)
        if found is not None and not _covers(params, *found):
            raise InputError(repr(self.layer), "per_example_positions does not cover every parameter",
                             path=tuple(self.path.split("/")))
        if not isinstance(self.mode, str):  # several quantities from the one pass: {mode: quantity}
            out = {m: dataclasses.replace(self, mode=m)._quantity(d_params, inner, params, x, d_y, context, found)
                   for m in self.mode}
            if self.hooks:
                out["layer"] = layer_parts
        else:
            out = self._quantity(d_params, inner, params, x, d_y, context, found)
        return (d_params, out), d_x

    def _quantity(self, d_params, inner, params, x, d_y, context, found):
        """This probe's mode's quantity for the layer, by the cheapest route it has."""
        if self.mode == "project":  # what per-example projections onto any direction read later (project())
            self.choices[self.path] = "Σ_t x_btᵀ V g_bt (positions)" if found is not None else "materialised"
            linear = {"x": x, "d_y": d_y} if self.layer.linear_in_params else {}
            if found is not None:  # (the positions serve sampled histograms; XLA drops what nothing reads)
                kept = {"groups": found[0], "rest": found[1]} | linear
                if any(g.materialises_norms(with_grads=False) for g in found[0]):
                    # the norms materialise these per-example gradients (the same ops: XLA computes
                    # them once), so a projection is a dot, not one more forward of the layer
                    self.choices[self.path] = "dots with the materialised per-example gradients"
                    kept["per"] = _grads_of(d_params, *found)
                return kept
            own = getattr(self.layer, "per_example_grads", None)  # (histograms read them; unread, XLA drops them)
            return {"per": own(inner, d_y) if callable(own) else _fallback_grads(self.layer, params, x, d_y, context)} \
                | linear
        if self.mode == "positions":  # the layer's (X, G) as arrays, their layout in choices (fbp.laplace.variances)
            if found is None:
                self.choices[self.path] = None
                return {"per": self._materialised(inner, params, x, d_y, context, record=False)}
            self.choices[self.path] = _layout(found[0])
            return {"parts": [[list(parts) for _, parts, _ in g.kernels] for g in found[0]],
                    "g": [g.g for g in found[0]], "rest": found[1]}
        if found is not None:
            return self._positions(d_params, *found)
        own_norms = getattr(self.layer, "per_example_sq_norms", None)
        if callable(own_norms) and self.mode in ("norms", "clip"):  # a norm without the gradient (ghost norm)
            sq, self.choices[self.path] = own_norms(inner, d_y)
            return {"sq": sq, "res": inner, "d_y": d_y} if self.mode == "clip" else sq
        return self._materialised(inner, params, x, d_y, context)

    def _positions(self, d_params, groups, rest):
        if self.mode.startswith("kfac"):  # fbp.curvature: Kronecker blocks, the rest as a diagonal
            self.choices[self.path] = _layout(groups)
            return {"blocks": [g.kronecker_factors(self.mode[5:]) for g in groups],
                    "diagonal": {k: jnp.sum(jnp.square(v), axis=0) for k, v in rest.items()}}
        if self.mode in ("sgs", "sgs-columns"):
            self.choices[self.path] = "(x²)ᵀ(g²)" if all(g.length == 1 for g in groups) else \
                "squares of materialised per-example gradients"
            columns = self.mode == "sgs-columns"  # finished after the column vmap (sum_columns)
            return assemble(d_params, {k: v for g in groups for k, v in (
                g.column_squares() if columns else g.sum_squares()).items()} |
                            {k: jnp.sum(jnp.square(v), axis=0) for k, v in rest.items()})
        if self.mode == "grads":
            self.choices[self.path] = "outer products over positions" if groups else "the layer's per-example rule"
            return _grads_of(d_params, groups, rest)
        found = [g.sq_norms(with_grads=self.mode == "clip") for g in groups]
        self.choices[self.path] = ", ".join(dict.fromkeys(how for _, how, _ in found)) or \
            "materialised (the layer's per-example rule)"
        sq = sum((s for s, _, _ in found), sq_norm(rest) if rest else 0.0)
        if self.mode == "clip":  # book-keeping: what the clipped sum's second step reads
            return {"sq": sq, "groups": groups, "per": [per for _, _, per in found], "rest": rest}
        return sq

    def _materialised(self, inner, params, x, d_y, context, record=True):
        own = getattr(self.layer, "per_example_grads", None)
        if callable(own):
            per, how = own(inner, d_y), "the layer's per_example_grads"
        else:
            per, how = _fallback_grads(self.layer, params, x, d_y, context), "vmap of the layer's rules"
        if not record:
            return per
        if self.mode in ("grads", "sgs", "sgs-columns") or self.mode.startswith("kfac"):
            self.choices[self.path] = [] if self.mode.startswith("kfac") else how
            return per if self.mode == "grads" else _diagonal_only(self.mode, _sum_squares(per))
        self.choices[self.path] = f"materialised ({how})"
        return {"sq": sq_norm(per), "per": per} if self.mode == "clip" else sq_norm(per)


def _layout(groups) -> list:
    """``[(((key, shape), ...), bias key), ...]``: which params each ``Positions`` group's kernels
    and bias are — the static half of what the K-FAC and ``"positions"`` modes return."""
    return [(tuple((key, shape) for key, _, shape in g.kernels), g.bias) for g in groups]


def _grads_of(d_params, groups, rest):
    """The layer's per-example gradients, shaped like its params: its groups' outer products
    over positions, and the rest as its rule gave them."""
    return assemble(d_params, {k: v for g in groups for k, v in g.grads().items()} | rest)


def _at(tree, key):
    for k in key if isinstance(key, tuple) else (key,):
        tree = tree[k]
    return tree


def project(kept, direction, layer: Layer | None = None) -> jax.Array:
    """``(B,)``: each example's gradient at one leaf projected onto ``direction`` (that leaf's
    params' shape), ``⟨∇ℓ_b, V⟩``, from what its probe kept in ``"project"`` mode: a dot with
    the per-example gradients where they are materialised anyway (a layer without positions, or
    one whose norms materialise them: 3C3D's first convolution, where a forward with ``V`` cost
    more than the shared gradients); for a layer linear in its params
    (``Layer.linear_in_params``) ``⟨d_y_b, forward(V, x)_b⟩`` — one forward of the layer,
    convolutions included; else ``Σ_t x_btᵀ V g_bt`` over a Dense-like weight's positions (one
    forward-sized product, ``Positions.dots``).

    Args:
        kept: the probe's ``"project"`` quantity at the leaf.
        direction: ``V``, shaped like the leaf's params.
        layer: the leaf layer (needed for the linear route).

    Returns:
        The projections.
    """
    def dot(per, v):
        return sum(jnp.tensordot(a.reshape(a.shape[0], -1), b.ravel().astype(a.dtype), 1)
                   for a, b in zip(jax.tree_util.tree_leaves(per), jax.tree_util.tree_leaves(v), strict=True)
                   if jnp.issubdtype(a.dtype, jnp.inexact))

    if "per" in kept:
        return dot(kept["per"], direction)
    if "x" in kept and layer is not None:
        y = run_forward(layer, direction, kept["x"])[0]
        return jnp.sum((y * kept["d_y"].astype(y.dtype)).reshape(y.shape[0], -1), axis=1)
    out = sum(group.dots(lambda key: _at(direction, key)) for group in kept["groups"])
    rest = kept["rest"]
    return out + dot([rest[k] for k in rest], [_at(direction, k) for k in rest]) if rest else out


def _diagonal_only(mode, sums):
    """In the K-FAC modes a layer without Kronecker blocks keeps the diagonal ``Σ_b (∇ℓ_b)²``."""
    if not mode.startswith("kfac"):
        return sums
    return {"blocks": [], "tree": sums}  # shaped like the layer's params


def probe_model(model: Layer, mode: str | tuple, choices: dict, hooks=(), check: bool = True) -> Layer:
    """``model`` with every leaf layer wrapped in a per-example probe.

    Args:
        model: the model.
        mode: what the probes return (``MODES``), or a tuple of them (possibly empty).
        choices: filled at trace time with ``{path: how each layer computed it}``.
        hooks: extensions that read every leaf's output and cotangents (``needs = "layer"``):
            ``from_output(y)`` in the forward, ``from_backward(part, d_y, d_x, d_params, params)``
            in the backward; their results come back under ``"layer"``, for parameter-free
            leaves too. A tuple for every leaf, or ``path -> tuple`` (telemetry's hooks know
            which cotangents training never computes at their leaf).
        check: refuse a leaf that mixes the examples of a batch (``fbp.independence``).

    Returns:
        The probed model; its params are ``map_leaf_params(model, params, lambda *_, p: (p, None))``.
    """
    hooks_at = hooks if callable(hooks) else (lambda path, every=tuple(hooks): every)
    return transform_layers(model, lambda path, layer: None if children(layer) else
                            _PerExample(layer, path, mode, choices, tuple(hooks_at(path)), check))


def sum_squares_probe(layer: Layer, path: str) -> Layer:
    """A leaf layer as a probe that also returns the squares of its per-example gradients.

    ``fbp.curvature.diag_hessian`` runs it column by column.

    Args:
        layer: a leaf layer with parameters.
        path: its path (for messages and the choice record).

    Returns:
        The probe: its params are ``(params, None)`` and its backward returns
        ``((d_params, Σ_b (∇ℓ_b)²), d_x)`` for the cotangent it receives.
    """
    return _PerExample(layer, path, "sgs")


def split_probed(model: Layer, d_probed) -> tuple[Any, dict]:
    """Separate a probed backward's ``d_params`` into the gradient and the per-example quantities.

    Args:
        model: the model (not the probed one).
        d_probed: the probed model's ``d_params``: ``(d_params, per)`` at every leaf.

    Returns:
        ``(grads, per)``: the gradient, shaped like the params, and ``{path: per}`` for every
        leaf with parameters.
    """
    found: dict[str, Any] = {}

    def take(path, leaf, d):
        if d[1] is not None:
            found[path] = d[1]
        return d[0]

    return map_leaf_params(model, d_probed, take), found
