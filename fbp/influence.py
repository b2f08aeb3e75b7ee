r"""Which training examples are responsible for a prediction, and which look mislabelled:
influence functions with exact, K-FAC and EK-FAC curvature, TracIn, and gradient similarity.

The **influence** of training example ``z_n`` on a test example ``z`` (Koh & Liang, 2017, in
Grosse et al.'s sign convention, 2023) is

.. math::  I(z, z_n) = ∇ℓ(z)^\top (H + λ I)^{-1} ∇ℓ(z_n),

the first-order decrease of the test loss when ``z_n`` is upweighted (``−I`` is Koh & Liang's
``I_{up,loss}``): positive = the example supports the prediction. ``H`` is the curvature of the
*mean* training loss — the GGN (``method="exact"``: dense; ``"kfac"``, ``"ekfac"``, ``"diag"``:
``fbp.laplace.structures``, all from fbp's one backward pass) or the Hessian itself
(``"hessian"``: dense, from the layers' second-order rules; indefinite, so a damping that leaves
``H + λI`` indefinite is refused — ``fbp.influence_hessian``) — and ``λ`` a damping
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
training set is ever held, and JAX's autodiff is never vmapped over examples.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fbp import checkpoint, influence_hessian
from fbp.core import Layer, Loss
from fbp.laplace.fitting import _chunks, _slices, curvature_of
from fbp.laplace.posterior import likelihood_of
from fbp.per_example import grads as per_example_grads
from fbp.subspace import subspace
from fbp.validation import typed_arguments

METHODS = ("exact", "hessian", "kfac", "ekfac", "diag", "gradient", "cosine")


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
    """One term of a score: per-example gradients at ``params``, preconditioned and weighted.

    Attributes:
        params: the params the gradients are taken at (a checkpoint, for TracIn).
        weight: the term's weight (``η_t``).
        hessian: a structure of ``fbp.laplace.structures`` (``H`` summed over the data), or
            ``None``: no preconditioning.
        scale: ``s`` in ``(s H + λI)⁻¹`` (``1/N``: the mean loss's curvature).
        damping: ``λ``.
        normalise: use unit-length gradients (``"cosine"``).
    """

    params: Any
    weight: float
    hessian: Any = None
    scale: float = 1.0
    damping: float = 0.0
    normalise: bool = False


@functools.lru_cache(maxsize=64)
def _functions(model, loss, space, normalise: bool, has_state: bool, preconditioned: bool):
    """The jitted per-batch functions, shared by every ``Influence`` of the same model and shapes."""
    grads_of = per_example_grads(model, loss, has_state=has_state)

    def gradients(params, state, x, y):
        g = jax.vmap(space.restrict)(grads_of(*((params, state) if has_state else (params,)), x, y)[1])
        if normalise:
            g = g / jnp.maximum(jnp.linalg.norm(g, axis=1, keepdims=True), jnp.finfo(g.dtype).tiny)
        return g

    def solved(params, state, x, y, hessian, scale, damping, weight):
        g = gradients(params, state, x, y)
        return g, weight * (jax.vmap(lambda r: hessian.solve(r, scale, damping))(g) if preconditioned else g)

    def test(params, state, x, y, hessian, scale, damping, weight):
        return solved(params, state, x, y, hessian, scale, damping, weight)[1]

    def own(params, state, x, y, hessian, scale, damping, weight):
        g, pre = solved(params, state, x, y, hessian, scale, damping, weight)
        return jnp.sum(g * pre, axis=1)

    def scores(v, params, state, x, y):
        return v @ gradients(params, state, x, y).T

    return jax.jit(test), jax.jit(own), jax.jit(scores)


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
    """

    model: Any
    loss: Any
    x: Any
    y: Any
    space: Any
    terms: tuple
    batch_size: int = 256
    state: Any = None

    def _of(self, t: Term):
        return _functions(self.model, self.loss, self.space, t.normalise, self.state is not None, t.hessian is not None)

    def _args(self, t: Term):
        return t.hessian, jnp.asarray(t.scale), jnp.asarray(t.damping), jnp.asarray(t.weight)

    def _each_chunk(self, x, y):
        n = jax.tree_util.tree_leaves(x)[0].shape[0]
        return [(_slices(x, lo, hi), _slices(y, lo, hi)) for lo, hi in _chunks(n, self.batch_size)]

    def scores(self, x_test, y_test) -> jax.Array:
        """``(n_test, n_train)``: ``I(z_test, z_n)`` for every pair.

        Args:
            x_test: the test inputs.
            y_test: their targets (the test loss's gradient is taken at them).

        Returns:
            The scores.
        """
        total = 0.0
        for t in self.terms:
            test, _, scores = self._of(t)
            v = jnp.concatenate([test(t.params, self.state, xb, yb, *self._args(t))
                                 for xb, yb in self._each_chunk(x_test, y_test)])
            total = total + jnp.concatenate([scores(v, t.params, self.state, xb, yb)
                                             for xb, yb in self._each_chunk(self.x, self.y)], axis=1)
        return total

    def self_influence(self) -> jax.Array:
        """``(n_train,)``: ``I(z_n, z_n)`` — rank by it to find mislabelled examples."""
        total = 0.0
        for t in self.terms:
            own = self._of(t)[1]
            total = total + jnp.concatenate([own(t.params, self.state, xb, yb, *self._args(t))
                                             for xb, yb in self._each_chunk(self.x, self.y)])
        return total


@typed_arguments
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
    if batch_size < 1:
        raise ValueError(f"fbp.influence.fit: batch_size must be at least 1, got {batch_size}")
    space = subspace(model, params, layers)
    if method in ("gradient", "cosine"):
        return Influence(model, loss, x, y, space, (Term(params, 1.0, normalise=method == "cosine"),), batch_size,
                         state)
    likelihood_of(loss)
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    if method == "hessian":  # dense, indefinite: fbp.influence_hessian
        h = influence_hessian.hessian_of(model, loss, params, x, y, space=space, state=state, batch_size=batch_size)
        lam = influence_hessian.default_damping(h, n) if damping is None else damping
        influence_hessian.require_definite(h, n, lam)
        return Influence(model, loss, x, y, space, (Term(params, 1.0, h, 1.0 / n, lam),), batch_size, state)
    structure = "full" if method == "exact" else method
    h, _, _ = curvature_of(model, loss, params, x, y, structure=structure, space=space, state=state,
                           batch_size=batch_size, approximation=approximation)
    lam = 0.1 * h.mean_eigenvalue() / n if damping is None else damping
    return Influence(model, loss, x, y, space, (Term(params, 1.0, h, 1.0 / n, lam),), batch_size, state)


@typed_arguments
def tracin(model: Layer, loss: Loss, checkpoints: Sequence | str | os.PathLike, x, y, *, learning_rates=1.0,
           layers=None, state=None, batch_size: int = 256) -> Influence:
    """TracIn-CP (Pruthi et al., 2020): ``Σ_t η_t ∇ℓ(z; θ_t)ᵀ ∇ℓ(z_n; θ_t)`` over ``checkpoints``.

    Args:
        model: the network.
        loss: the loss.
        checkpoints: the saved params ``θ_t``: a list of params pytrees, or the
            ``checkpoint_dir`` of a ``fit`` run (a path): the params of every step it holds,
            oldest first (``fit(..., keep_checkpoints=None)`` keeps every epoch's).
        x: the training inputs.
        y: the training targets.
        learning_rates: ``η_t``: one number, or one per checkpoint.
        layers: the layers whose parameters count.
        state: the model's state, or ``None``.
        batch_size: examples per compiled batch.

    Returns:
        An ``Influence`` (``scores``, ``self_influence``).
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = _fit_params(model, checkpoints, x)
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("fbp.influence.tracin: no checkpoints")
    rates = [learning_rates] * len(checkpoints) if np.ndim(learning_rates) == 0 else list(learning_rates)
    if not all(isinstance(r, (int, float, np.number)) and not isinstance(r, bool) and np.isfinite(r) for r in rates):
        raise ValueError(f"fbp.influence.tracin: learning_rates must be finite numbers (one, or one per checkpoint), "
                         f"got {learning_rates!r}")
    if len(rates) != len(checkpoints):
        raise ValueError(f"fbp.influence.tracin: {len(rates)} learning rates for {len(checkpoints)} checkpoints")
    space = subspace(model, checkpoints[0], layers)
    terms = tuple(Term(p, float(r)) for p, r in zip(checkpoints, rates, strict=True))
    return Influence(model, loss, x, y, space, terms, batch_size, state)


def _fit_params(model: Layer, directory, x) -> list:
    """The params of every step in a ``fit`` run's checkpoint directory, oldest first."""
    steps = checkpoint.all_steps(directory)
    if not steps:
        raise ValueError(f"fbp.influence.tracin: no checkpoint in {os.fspath(directory)!r}")
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(x[:1])))
    return [jax.tree_util.tree_map(jnp.asarray, checkpoint.restore(directory, target, s, prefix="carry/params"))
            for s in steps]


__all__ = ["METHODS", "Influence", "Term", "fit", "tracin"]
