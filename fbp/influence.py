r"""Which training examples are responsible for a prediction, and which look mislabelled:
influence functions with exact, K-FAC and EK-FAC curvature, TracIn, and gradient similarity.

The **influence** of training example ``z_n`` on a test example ``z`` (Koh & Liang, 2017, in
Grosse et al.'s sign convention, 2023) is

.. math::  I(z, z_n) = ∇ℓ(z)^\top (H + λ I)^{-1} ∇ℓ(z_n),

the first-order decrease of the test loss when ``z_n`` is upweighted (``−I`` is Koh & Liang's
``I_{up,loss}``): positive = the example supports the prediction. ``H`` is the curvature of the
*mean* training loss — the GGN (``method="exact"``: dense; ``"kfac"``, ``"ekfac"``, ``"diag"``:
``fbp.laplace.structures``, all from fbp's one backward pass) or the Hessian
(``"hessian"``: dense, by Hessian-vector products; it may be indefinite) — and ``λ`` a damping
(default ``0.1 ×`` the mean eigenvalue of the structure, as Grosse et al.).

* **Self-influence** ``I(z_n, z_n)`` ranks training examples by how much their own loss depends
  on themselves: mislabelled examples rank high (Koh & Liang §5.4; Pruthi et al., 2020).
* **TracIn** (Pruthi et al., 2020): ``Σ_t η_t ∇ℓ(z; θ_t)ᵀ ∇ℓ(z_n; θ_t)`` over saved checkpoints
  ``θ_t`` with learning rates ``η_t`` (``tracin``).
* **Gradient similarity**: ``"gradient"`` (``H = I``, ``λ = 0``: the dot product) and
  ``"cosine"`` (the normalised one).

Per-example training gradients come from the one-pass engine (``fbp.per_example.grads``), one
batch at a time; the test gradients are preconditioned once (``(H + λI)⁻¹ G_test``), so the
scores of a batch are one ``(n_test × dim) · (dim × B)`` product — no Jacobian of the whole
training set is ever held, and no ``vmap(jax.grad)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import Layer, Loss
from fbp.laplace.fitting import _chunks, _slices, curvature_of
from fbp.laplace.posterior import likelihood_of
from fbp.per_example import grads as per_example_grads
from fbp.subspace import subspace

METHODS = ("exact", "hessian", "kfac", "ekfac", "diag", "gradient", "cosine")


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
    """One term of a score: per-example gradients at ``params``, preconditioned and weighted.

    Attributes:
        params: the params the gradients are taken at (a checkpoint, for TracIn).
        weight: the term's weight (``η_t``).
        solve: ``g -> (H + λI)⁻¹ g`` on flat gradients, or ``None`` (the identity).
        normalise: use unit-length gradients (``"cosine"``).
    """

    params: Any
    weight: float
    solve: Any
    normalise: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Influence:
    """Influence scores over a training set; build it with ``fit`` or ``tracin``.

    Attributes:
        model: the model.
        loss: the loss.
        x: the training inputs.
        y: the training targets.
        space: the ``fbp.subspace.Subspace`` the gradients live on.
        terms: the ``Term`` s summed.
        batch_size: examples per compiled batch.
        state: the model state, or ``None``.
        cache: the compiled batch functions.
    """

    model: Any
    loss: Any
    x: Any
    y: Any
    space: Any
    terms: tuple
    batch_size: int = 256
    state: Any = None
    cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def _gradients(self, params, x, y, normalise):
        """``(B, dim)`` per-example gradients (one pass of the engine)."""
        args = (params, self.state) if self.state is not None else (params,)
        g = jax.vmap(self.space.restrict)(per_example_grads(self.model, self.loss, has_state=self.state is not None)(
            *args, x, y)[1])
        if normalise:
            g = g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), jnp.finfo(g.dtype).tiny)
        return g

    def _jit(self, name, fn):
        if name not in self.cache:
            self.cache[name] = jax.jit(fn)
        return self.cache[name]

    def _preconditioned(self, x, y):
        """Per term, ``(H + λI)⁻¹`` applied to the test gradients, weighted: ``[(n, dim), ...]``."""
        out = []
        for i, t in enumerate(self.terms):
            def run(x, y, t=t):
                g = self._gradients(t.params, x, y, t.normalise)
                return t.weight * (g if t.solve is None else jax.vmap(t.solve)(g))
            n = jax.tree_util.tree_leaves(x)[0].shape[0]
            out.append(jnp.concatenate([self._jit(("test", i), run)(_slices(x, lo, hi), _slices(y, lo, hi))
                                        for lo, hi in _chunks(n, self.batch_size)]))
        return out

    def scores(self, x_test, y_test) -> jax.Array:
        """``(n_test, n_train)``: ``I(z_test, z_n)`` for every pair."""
        pre = self._preconditioned(x_test, y_test)
        n = jax.tree_util.tree_leaves(self.x)[0].shape[0]
        columns = []
        for lo, hi in _chunks(n, self.batch_size):
            xb, yb = _slices(self.x, lo, hi), _slices(self.y, lo, hi)
            total = 0.0
            for i, (t, v) in enumerate(zip(self.terms, pre, strict=True)):
                run = self._jit(("train", i), lambda v, xb, yb, t=t: v @ self._gradients(t.params, xb, yb,
                                                                                           t.normalise).T)
                total = total + run(v, xb, yb)
            columns.append(total)
        return jnp.concatenate(columns, axis=1)

    def self_influence(self) -> jax.Array:
        """``(n_train,)``: ``I(z_n, z_n)`` — rank by it to find mislabelled examples."""
        n = jax.tree_util.tree_leaves(self.x)[0].shape[0]
        out = []
        for lo, hi in _chunks(n, self.batch_size):
            xb, yb = _slices(self.x, lo, hi), _slices(self.y, lo, hi)
            total = 0.0
            for i, t in enumerate(self.terms):
                def run(xb, yb, t=t):
                    g = self._gradients(t.params, xb, yb, t.normalise)
                    return t.weight * jnp.sum(g * (g if t.solve is None else jax.vmap(t.solve)(g)), axis=1)
                total = total + self._jit(("self", i), run)(xb, yb)
            out.append(total)
        return jnp.concatenate(out)


def fit(model: Layer, loss: Loss, params, x, y, *, method: str = "ekfac", damping: float | None = None, layers=None,
        state=None, batch_size: int = 256, approximation: str = "expand") -> Influence:
    """Influence functions over the training set ``(x, y)`` at trained ``params`` (module docstring).

    Args:
        model: the trained network.
        loss: the training loss (for the curvature methods a negative log-likelihood, as ``fbp.laplace``).
        params: the params.
        x: the training inputs.
        y: the training targets.
        method: one of ``METHODS``.
        damping: ``λ``; ``None``: ``0.1 ×`` the mean eigenvalue of the curvature structure.
        layers: the layers whose parameters count (leaf paths; ``None``: all).
        state: the model's state, or ``None``.
        batch_size: examples per compiled batch.
        approximation: K-FAC's ``"expand"`` or ``"reduce"``.

    Returns:
        An ``Influence``.
    """
    if method not in METHODS:
        raise ValueError(f"fbp.influence.fit: method must be one of {METHODS}, got {method!r}")
    space = subspace(model, params, layers)
    if method in ("gradient", "cosine"):
        term = Term(params, 1.0, None, method == "cosine")
        return Influence(model, loss, x, y, space, (term,), batch_size, state)
    likelihood_of(loss)
    structure = {"exact": "full", "hessian": "full"}.get(method, method)
    h, _, _ = curvature_of(model, loss, params, x, y, structure=structure, space=space, state=state,
                           batch_size=batch_size, approximation=approximation, hessian=method == "hessian")
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    lam = 0.1 * h.mean_eigenvalue() / n if damping is None else damping
    return Influence(model, loss, x, y, space, (Term(params, 1.0, lambda g: h.solve(g, 1.0 / n, lam)),),
                     batch_size, state)


def tracin(model: Layer, loss: Loss, checkpoints: Sequence, x, y, *, learning_rates=1.0, layers=None, state=None,
           batch_size: int = 256) -> Influence:
    """TracIn-CP (Pruthi et al., 2020): ``Σ_t η_t ∇ℓ(z; θ_t)ᵀ ∇ℓ(z_n; θ_t)`` over ``checkpoints``.

    Args:
        model: the network.
        loss: the loss.
        checkpoints: the saved params ``θ_t`` (a list of params pytrees).
        x: the training inputs.
        y: the training targets.
        learning_rates: ``η_t``: one number, or one per checkpoint.
        layers: the layers whose parameters count.
        state: the model's state, or ``None``.
        batch_size: examples per compiled batch.

    Returns:
        An ``Influence`` (``scores``, ``self_influence``).
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("fbp.influence.tracin: no checkpoints")
    rates = [learning_rates] * len(checkpoints) if np.ndim(learning_rates) == 0 else list(learning_rates)
    if len(rates) != len(checkpoints):
        raise ValueError(f"fbp.influence.tracin: {len(rates)} learning rates for {len(checkpoints)} checkpoints")
    space = subspace(model, checkpoints[0], layers)
    terms = tuple(Term(p, float(r), None) for p, r in zip(checkpoints, rates, strict=True))
    return Influence(model, loss, x, y, space, terms, batch_size, state)


__all__ = ["METHODS", "Influence", "Term", "fit", "tracin"]
