r"""K-FAC: natural-gradient steps preconditioned by Kronecker-factored curvature, with the
factors and the gradient from one forward pass and its backward (``fbp.curvature.kfac_factors``).

Every Dense-like weight ``W: (fan_in [+1], n_out)`` (bias as a last row) has the curvature
block ``A ⊗ G``. With ``damping_mode="exact"`` (default) its preconditioned gradient is the
exact damped inverse of that product,

.. math::  \operatorname{vec}^{-1}\big((A \otimes G + \lambda I)^{-1} \operatorname{vec} \nabla_W\big)
           = Q_A \Big[\frac{Q_A^\top \nabla_W Q_G}{\lambda_A \lambda_G^\top + \lambda}\Big] Q_G^\top,

from the eigendecompositions ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``G = Q_G diag(λ_G) Q_Gᵀ`` (four
matrix products per block and step). ``damping_mode="factored"`` is Martens & Grosse's
factored Tikhonov damping (§6.3),
``(A + π√λ I)⁻¹ ∇_W (G + √λ/π I)⁻¹`` with ``π² = (tr A / dim A) / (tr G / dim G)``: two
products per step, the damped factors inverted by Cholesky (no eigendecomposition; ``π`` from
the traces). Every other parameter
(norm scales, embeddings) is divided by its exact GGN diagonal plus ``λ``.

The factors are exponential moving averages, **bias-corrected** by default: after ``t``
observations ``F_t = Σ_i decay^{t-i} F_i / Σ_i decay^{t-i}`` — the update
``F ← (1 - c_t) F + c_t F_batch`` with ``c_t = (1 - decay) / (1 - decay^t)`` (Adam's
correction; kfac-jax's weighted moving average), so the first batch weighs ``1/t``-like at
first, not ``decay`` for tens of steps. ``debias=False`` keeps the plain average
``F ← decay F + (1 - decay) F_batch`` started at the first batch's factors. They are updated
every ``curvature_every`` steps (the other steps run the plain backward); the
eigendecompositions are refreshed every ``inverse_every`` steps (Martens & Grosse, 2015).
The preconditioned gradient then goes through any ``fbp.optim`` transformation — momentum,
a learning-rate schedule, clipping — so ``kfac(model, loss, fbp.optim.sgd(0.1, momentum=0.9))`` is K-FAC with momentum.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import InputError, map_leaf_params, value_and_grad
from fbp.curvature import Factors, KroneckerBlock, KroneckerFactors, block_entries, block_matrix, kfac_factors
from fbp.nn.positions import assemble
from fbp.optim.base import GradientTransformation, apply_updates
from fbp.validation import require_number, typed_arguments

PyTree = Any


class KFACState(NamedTuple):
    """``count`` steps taken; ``factors[path]``: the moving-average ``Factors``;
    ``eigen[path]``: per block ``(Q_A, λ_A, Q_G, λ_G)`` (``"exact"``) or ``(A⁻¹, 0, G⁻¹, 0)``
    of the damped factors (``"factored"``); ``inner``: the optimizer's state."""

    count: jax.Array
    factors: dict
    eigen: dict
    inner: PyTree


def _by_eigen(m, shift):
    """``(M + shift I)⁻¹`` from ``M``'s eigendecomposition, rounding's negative eigenvalues set to 0."""
    lam, q = jnp.linalg.eigh(m)
    return (q / (jnp.maximum(lam, 0) + shift)) @ q.T


def _damped_inverse(m, shift):
    """``(M + shift I)⁻¹`` for a positive semi-definite ``M``: by Cholesky (measured on the CPU
    in float32: 0.26 against 1.5 ms for an eigendecomposition at 129 rows, 29 against 98 ms at
    1025), and from the eigendecomposition where Cholesky fails (a shift below the rounding of ``M``'s
    null space); ``lax.cond`` runs only the branch taken."""
    eye = jnp.eye(m.shape[0], dtype=m.dtype)
    inverse = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(m + shift * eye, lower=True), eye)
    return lax.cond(jnp.all(jnp.isfinite(inverse)), lambda: inverse, lambda: _by_eigen(m, shift))


def _eigen(block: KroneckerBlock, damping: float, mode: str):
    if mode == "factored":  # π from the traces (the eigenvalues' means); no eigendecomposition
        pi = jnp.sqrt((jnp.trace(block.A) / block.A.shape[0] + 1e-30) / (jnp.trace(block.G) / block.G.shape[0] + 1e-30))
        zero = jnp.zeros((), block.A.dtype)
        return (_damped_inverse(block.A, pi * jnp.sqrt(damping)), zero,
                _damped_inverse(block.G, jnp.sqrt(damping) / pi), zero)
    la, qa = jnp.linalg.eigh(block.A)
    lg, qg = jnp.linalg.eigh(block.G)
    return qa, jnp.maximum(la, 0), qg, jnp.maximum(lg, 0)  # rounding can leave tiny negative eigenvalues


@dataclasses.dataclass(frozen=True)
class KFAC:
    """K-FAC over ``model`` and ``loss``; build it with ``kfac(...)``, whose Args these are.

    Args:
        model: the model.
        loss: the loss.
        optimizer: the transformation applied to the preconditioned gradient.
        damping: λ, added to the curvature.
        decay: the factors' moving-average decay.
        inverse_every: steps between eigendecompositions.
        mc_samples: sampled targets per example, or ``None`` for the exact factor.
        approximation: ``"expand"`` or ``"reduce"`` for weight sharing.
        damping_mode: ``"exact"`` or ``"factored"``.
        curvature_every: steps between factor updates.
        debias: bias-correct the factors' moving average (module docstring).
    """

    model: Any
    loss: Any
    optimizer: GradientTransformation
    damping: float
    decay: float
    inverse_every: int
    mc_samples: int | None
    approximation: str
    damping_mode: str = "exact"
    curvature_every: int = 1
    debias: bool = True

    @property
    def _factors_of(self):
        return kfac_factors(self.model, self.loss, mc_samples=self.mc_samples, approximation=self.approximation,
                            train=True, with_grads=True)

    def init(self, params, x, y, *, key=None) -> KFACState:
        """The state for ``params``; ``x, y`` (an example batch, only shapes are read) fix the
        factors' shapes."""
        key = jax.random.key(0) if key is None else key
        shapes = jax.eval_shape(lambda p, a, b: self._factors_of(p, a, b, key=key)[2], params, x, y)
        factors = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return KFACState(jnp.zeros((), jnp.int32), factors, self._eigen_of(factors), self.optimizer.init(params))

    def _eigen_of(self, factors):
        return {path: [_eigen(b, self.damping, self.damping_mode) for b in f.blocks] for path, f in factors.items()}

    def observe(self, state: KFACState, factors: dict) -> KFACState:
        """``state`` with the moving averages updated by this batch's ``factors`` and, on every
        ``inverse_every``-th step, fresh eigendecompositions."""
        t = (state.count // self.curvature_every + 1).astype(jnp.result_type(float))  # this observation: 1, 2, ...
        later = (1 - self.decay) / (1 - self.decay ** t) if self.debias else 1 - self.decay
        weight = jnp.where(t == 1, 1.0, later)  # the first observation is the average
        mix = lambda old, new: (1 - weight).astype(old.dtype) * old + weight.astype(new.dtype) * new  # noqa: E731
        averaged = jax.tree_util.tree_map(mix, state.factors, factors)
        eigen = lax.cond(state.count % self.inverse_every == 0, self._eigen_of, lambda _: state.eigen, averaged)
        return state._replace(factors=averaged, eigen=eigen)

    def precondition(self, grads, state: KFACState):
        """``(F + λ I)⁻¹ grads`` blockwise (module docstring)."""

        def leaf(path, layer, g):
            if path not in state.factors:
                return g
            factors: Factors = state.factors[path]
            out = jax.tree_util.tree_map(lambda a, d: a / (d + self.damping), g, factors.diagonal)
            for block, (qa, la, qg, lg) in zip(factors.blocks, state.eigen[path], strict=True):
                out = assemble(out, self._block(g, block, qa, la, qg, lg))
            return out

        return map_leaf_params(self.model, grads, leaf)

    def _block(self, g, block: KroneckerBlock, qa, la, qg, lg) -> dict:
        w = block_matrix(g, block)
        if self.damping_mode == "exact":
            nat = qa @ ((qa.T @ w @ qg) / (la[:, None] * lg[None, :] + self.damping)) @ qg.T
        else:  # qa, qg hold the damped inverses
            nat = qa @ w @ qg
        return block_entries(nat, block, g)

    def transformation(self, x, y, *, key=None) -> GradientTransformation:
        """K-FAC as an optimizer like the others, for ``fbp.train.make_step`` and ``fit``.

        Its ``update`` reads the Kronecker factors of the training step's own pass through the
        engine (``GradientTransformation.extensions``: ``fbp.curvature.KroneckerFactors``), on
        every ``curvature_every``-th step (``due``); the steps between run the plain backward.
        Its state is a ``KFACState`` (a pytree: it checkpoints and resumes like any other).

        Args:
            x: an example batch's inputs (only shapes are read: they fix the factors' shapes).
            y: its targets.
            key: a key for that shape evaluation (sampled factors; any key).

        Returns:
            A ``GradientTransformation`` with ``extensions`` and ``due`` set. Called without
            ``extras`` (outside a training step) ``update`` preconditions with the factors it has.
        """
        needs = KroneckerFactors(self.mc_samples, self.approximation)

        def init(params):
            return self.init(params, x, y, key=key)

        def update(grads, state, params=None, *, extras=None):
            if extras is not None:
                new = extras[needs.name]
                state = self.observe(state, new) if self.curvature_every == 1 else \
                    lax.cond(self._due(state), lambda s: self.observe(s, new), lambda s: s, state)
            updates, inner = self.optimizer.update(self.precondition(grads, state), state.inner, params)
            return updates, state._replace(count=state.count + 1, inner=inner)

        return GradientTransformation(init, update, (needs,), self._due if self.curvature_every > 1 else None)

    def _due(self, state: KFACState):
        return state.count % self.curvature_every == 0

    def step(self, params, state: KFACState, x, y, *, key=None):
        """One K-FAC step: ``(params, state, loss_value)``. ``key``: for sampled factors and
        random layers (required then)."""
        if self.curvature_every == 1:
            value, grads, factors = self._factors_of(params, x, y, key=key)
            state = self.observe(state, factors)
        else:
            def plain(_):
                model_key = jax.random.split(key)[0] if key is not None and self.model.needs_key else key
                value, grads = value_and_grad(self.model, self.loss)(params, x, y, key=model_key)
                return value, grads, state

            def curvature(_):
                value, grads, factors = self._factors_of(params, x, y, key=key)
                return value, grads, self.observe(state, factors)

            value, grads, state = lax.cond(state.count % self.curvature_every == 0, curvature, plain, None)
        updates, inner = self.optimizer.update(self.precondition(grads, state), state.inner, params)
        return apply_updates(params, updates), state._replace(count=state.count + 1, inner=inner), value


@typed_arguments
def kfac(model, loss, optimizer: GradientTransformation, *, damping: float = 0.1, decay: float = 0.95,
         inverse_every: int = 10, mc_samples: int | None = 1, approximation: str = "expand",
         damping_mode: str = "exact", curvature_every: int = 1, debias: bool = True) -> KFAC:
    """K-FAC with ``optimizer`` applied to the preconditioned gradient.

    Args:
        model: the network (BatchNorm in training mode is refused).
        loss: a ``fbp.losses`` loss.
        optimizer: a ``fbp.optim`` transformation, e.g. ``fbp.optim.sgd(0.1, momentum=0.9)``.
        damping: ``λ`` added to the Kronecker product (and to the diagonal blocks).
        decay: the factors' moving-average decay.
        inverse_every: steps between eigendecompositions.
        mc_samples: sampled columns per example (K-FAC's Monte-Carlo Fisher), or ``None`` for
            the exact factor (KFLR: one column per output).
        approximation: ``"expand"`` or ``"reduce"`` for weights shared over positions.
        damping_mode: ``"exact"`` (the damped Kronecker product inverted exactly) or
            ``"factored"`` (Martens & Grosse's factored damping: half the products per step).
        curvature_every: steps between factor updates (the steps between run the plain backward).
        debias: bias-correct the factors' moving average (module docstring); ``False``: the plain
            average from the first batch (fbp's only average before).

    Returns:
        A ``KFAC`` with ``init(params, x, y) -> state`` and
        ``step(params, state, x, y, *, key=None) -> (params, state, loss_value)`` (jit it);
        ``transformation(x, y)`` makes it a ``GradientTransformation`` for ``make_step`` and
        ``fit`` (``fit`` also takes the ``KFAC`` itself).
    """
    if model.has_state:  # no has_state mode here: say what to do instead
        from fbp.core import leaf_layers

        paths = [p or "<root>" for p, leaf in leaf_layers(model) if leaf.has_state]
        raise InputError(repr(model), f"fbp.kfac.kfac does not train models that keep state (the layers at {paths}, "
                                      f"e.g. BatchNorm): replace BatchNorm by LayerNorm or GroupNorm, or train with "
                                      f"a first-order optimizer through fbp.train.fit")
    require_number("fbp.kfac.kfac", "damping", damping, low=0, low_open=True)
    require_number("fbp.kfac.kfac", "decay", decay, low=0, high=1, high_open=True)
    for name, value, ok, need in (
                                  ("inverse_every", inverse_every,
                                   isinstance(inverse_every, int) and inverse_every >= 1, "an int >= 1"),
                                  ("curvature_every", curvature_every,
                                   isinstance(curvature_every, int) and curvature_every >= 1, "an int >= 1"),
                                  ("damping_mode", damping_mode, damping_mode in ("exact", "factored"),
                                   "'exact' or 'factored'")):
        if not ok:
            raise ValueError(f"fbp.kfac.kfac: {name} must be {need}, got {value!r}")
    if not isinstance(optimizer, GradientTransformation):
        raise TypeError(f"fbp.kfac.kfac: optimizer must be a fbp.optim transformation (e.g. fbp.optim.sgd(0.1)), "
                        f"got {type(optimizer).__name__}")
    kfac_factors(model, loss, mc_samples=mc_samples, approximation=approximation)  # checks both
    return KFAC(model, loss, optimizer, damping, decay, inverse_every, mc_samples, approximation, damping_mode,
                curvature_every, debias)


__all__ = ["KFAC", "KFACState", "kfac"]
