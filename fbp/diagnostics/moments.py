"""Gradient-noise diagnostics from the per-example gradients of one pass (Cockpit's tests).

Notation: ``g_b = ∇ℓ_b`` is example ``b``'s gradient (its own loss, as ``fbp.per_example``),
``ḡ = (1/B) Σ_b g_b`` the mini-batch mean, ``S = Σ_b ‖g_b‖²`` and ``p_b = g_bᵀ ḡ``. Every
quantity is a whole-model scalar built from these sums; none materialises a per-example
gradient: ``‖g_b‖²`` comes from each layer's norm rule (``‖x_b‖²‖g_b‖²``, the ghost norm), and
``p_b`` from each layer's inputs and output cotangents, ``Σ_t x_btᵀ Ḡ g_bt`` per Dense-like
weight (``fbp.probes.project``: one product the size of the layer's forward).

* **Gradient noise scale** (McCandlish et al., 2018, App. A, ``B_small = 1``, ``B_big = B``):
  unbiased ``|G|² ≈ (B ‖ḡ‖² − S/B)/(B − 1)`` and ``tr Σ ≈ (S − B ‖ḡ‖²)/(B − 1)``;
  ``B_simple = tr Σ / |G|²``, the batch size beyond which larger batches stop paying.
* **Norm test** (Byrd et al., 2012, eq. 3.9, as Cockpit): ``θ = sqrt(tr Σ / (B ‖ḡ‖²))``.
* **Inner-product test** (Bollapragada et al., 2018, eq. 2.6): ``Var(p) = (Σ p_b² − B ‖ḡ‖⁴)/(B − 1)``,
  ``θ = sqrt(Var(p) / (B ‖ḡ‖⁴))``.
* **Orthogonality test** (Bollapragada et al., 2018, eq. 3.3): ``Var_⊥ = (S − Σ p_b²/‖ḡ‖²)/(B − 1)``,
  ``ν = sqrt(Var_⊥ / (B ‖ḡ‖²))``.
* **Gradient signal-to-noise ratio** (Liu et al., 2020), per parameter ``ḡ_i² / (SGS_i/B − ḡ_i² + ε)``
  with ``SGS = Σ_b g_b²`` (``(x²)ᵀ(g²)`` per layer), averaged per leaf and over the model (Cockpit's MeanGSNR).

Each test is the largest θ (ν) for which the test would pass at this batch: values above 1
say the batch is small for the noise in its gradient (the tests' own thresholds are 0.5–0.9).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fbp.core import leaf_layers, map_leaf_params
from fbp.extensions import Extension
from fbp.probes import project


def _sq(tree) -> jax.Array:
    return sum((jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)), jnp.zeros(()))


def mean_sq_norm(context) -> jax.Array:
    """``‖ḡ‖²``: the squared norm of the mean per-example gradient.

    Args:
        context: the pass (``fbp.extensions.Context``).

    Returns:
        A scalar.
    """
    return _sq(context.summed) / context.batch ** 2


def example_sq_norms(found_norms: dict, context) -> jax.Array:
    """Each example's squared gradient norm over the whole model.

    Args:
        found_norms: ``{leaf path: (B,) squared norms}`` (the ``"norms"`` probes).
        context: the pass.

    Returns:
        ``(B,)``.
    """
    return sum(found_norms.values(), jnp.zeros((context.batch,), context.values.dtype))


def by_leaf(model, tree) -> dict:
    """A params-shaped tree split by leaf layer.

    Args:
        model: the model.
        tree: a tree shaped like its params.

    Returns:
        ``{leaf path: that leaf's part of tree}``.
    """
    out: dict = {}
    map_leaf_params(model, tree, lambda path, leaf, p: out.setdefault(path, p))
    return out


def projections(kept: dict, direction: dict, model) -> jax.Array:
    """``(B,)``: ``g_bᵀ v`` for a direction given by leaf path, from what the ``"project"`` probes
    kept (``fbp.probes.project``: ``Σ_t x_btᵀ V g_bt`` per Dense-like weight — one product of
    the forward's size per direction — never the per-example gradient where positions exist).

    Args:
        kept: ``{leaf path: what its "project" probe kept}``.
        direction: ``{leaf path: v at that leaf}`` (``by_leaf``).
        model: the model (its leaf layers).

    Returns:
        ``(B,)``.
    """
    layers = dict(leaf_layers(model))
    return sum(project(k, direction[path], layers[path]) for path, k in kept.items())


def _unbiased(context, s, g2):
    b = context.batch
    return (s - b * g2) / (b - 1), (b * g2 - s / b) / (b - 1)


@dataclasses.dataclass(frozen=True)
class NoiseScale(Extension):
    """``{"b_simple", "trace_cov", "grad_sq"}``: McCandlish's simple noise scale and its two
    unbiased estimates (module docstring). Needs a batch of at least 2."""

    name: ClassVar[str] = "noise_scale"
    needs: ClassVar[str] = "norms"

    def finalize(self, found, context):
        trace_cov, grad_sq = _unbiased(context, jnp.sum(example_sq_norms(found, context)), mean_sq_norm(context))
        return {"b_simple": trace_cov / grad_sq, "trace_cov": trace_cov, "grad_sq": grad_sq}


@dataclasses.dataclass(frozen=True)
class NormTest(Extension):
    """The norm test's largest passing θ (Byrd et al., 2012; module docstring)."""

    name: ClassVar[str] = "norm_test"
    needs: ClassVar[str] = "norms"

    def finalize(self, found, context):
        g2 = mean_sq_norm(context)
        trace_cov = _unbiased(context, jnp.sum(example_sq_norms(found, context)), g2)[0]
        return jnp.sqrt(jnp.maximum(trace_cov, 0) / (context.batch * g2))


def _mean_projections(kept, context):
    """``p_b = g_bᵀ ḡ``, once per pass (the inner-product and orthogonality tests share it)."""
    b, shared = context.batch, context.shared if context.shared is not None else {}
    if "projections onto the mean gradient" not in shared:
        shared["projections onto the mean gradient"] = projections(
            kept, {path: jax.tree_util.tree_map(lambda g: g / b, context.leaf_grads[path]) for path in kept},
            context.model)
    return shared["projections onto the mean gradient"]


@dataclasses.dataclass(frozen=True)
class InnerTest(Extension):
    """The inner-product test's largest passing θ (Bollapragada et al., 2018; module docstring)."""

    name: ClassVar[str] = "inner_test"
    needs: ClassVar[str] = "project"

    def finalize(self, found, context):
        g2, b = mean_sq_norm(context), context.batch
        p = _mean_projections(found, context)
        var = (jnp.sum(jnp.square(p)) - b * g2 ** 2) / (b - 1)
        return jnp.sqrt(jnp.maximum(var, 0) / (b * g2 ** 2))


@dataclasses.dataclass(frozen=True)
class OrthoTest(Extension):
    """The orthogonality test's largest passing ν (Bollapragada et al., 2018; module docstring)."""

    name: ClassVar[str] = "ortho_test"
    needs: ClassVar[tuple] = ("norms", "project")

    def finalize(self, found, context):
        g2, b = mean_sq_norm(context), context.batch
        p = _mean_projections(found["project"], context)
        var = (jnp.sum(example_sq_norms(found["norms"], context)) - jnp.sum(jnp.square(p)) / g2) / (b - 1)
        return jnp.sqrt(jnp.maximum(var, 0) / (b * g2))


@dataclasses.dataclass(frozen=True)
class GradientSNR(Extension):
    """``{"mean", "layers": {path: mean}}``: the gradient signal-to-noise ratio
    ``ḡ_i² / (SGS_i/B − ḡ_i² + ε)`` averaged over each leaf's parameters and over the model
    (Liu et al., 2020; Cockpit's MeanGSNR with its ``ε``).

    Args:
        epsilon: ``ε``, against a zero variance.
    """

    epsilon: float = 1e-5
    name: ClassVar[str] = "gradient_snr"
    needs: ClassVar[str] = "sgs"

    def finalize(self, found, context):
        b = context.batch
        per = {path: [m ** 2 / (s / b - m ** 2 + self.epsilon)
                      for s, m in zip(jax.tree_util.tree_leaves(sgs),
                                      [g / b for g in jax.tree_util.tree_leaves(context.leaf_grads[path])],
                                      strict=True)] for path, sgs in found.items()}
        count = sum(a.size for ratios in per.values() for a in ratios)
        total = sum(jnp.sum(a) for ratios in per.values() for a in ratios)
        return {"mean": total / count,
                "layers": {path: sum(jnp.sum(a) for a in r) / sum(a.size for a in r) for path, r in per.items()}}


@dataclasses.dataclass(frozen=True)
class GradNorm(Extension):
    """``{"total", "layers": {path: ‖ḡ_leaf‖}}``: the norms of the reduced loss's gradient."""

    name: ClassVar[str] = "grad_norm"
    needs: ClassVar[str] = "norms"
    requires_independence: ClassVar[bool] = False

    def finalize(self, found, context):
        layers = {path: jnp.sqrt(_sq(g)) * context.scale for path, g in context.leaf_grads.items()
                  if jax.tree_util.tree_leaves(g)}
        return {"total": jnp.sqrt(_sq(context.grads)), "layers": layers}
