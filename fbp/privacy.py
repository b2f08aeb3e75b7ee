"""DP-SGD: per-example clipping in one backward pass, Gaussian noise (Abadi et al., 2016).

For per-example gradients ``g_b`` and a clipping norm ``C``, DP-SGD's update direction is::

    ĝ = (1 / B̄) ( Σ_b min(1, C / ‖g_b‖) g_b  +  σ C z ),   z ~ N(0, I)

with ``B̄`` the expected batch size (Poisson sampling) and ``σ`` the noise multiplier.

**One backward pass, then book-keeping** (Bu et al., 2023). The backward pass of the batch runs
once; at every layer with parameters ``fbp.per_example`` computes the per-example squared
norms from the layer's input and output cotangent (``‖x_b‖‖g_b‖`` for a Dense, ghost norms over
positions) and keeps the residuals and the cotangent it already holds. With the total norms
known, each layer's clipped sum is ``Σ_b c_b X_bᵀ G_b = Xᵀ (c ⊙ G)`` — one matmul over the batch
from the inputs and product cotangents the backward already holds (``fbp.nn.positions``; for
an LSTM the gate cotangents of the one reverse scan). Where the norm's route materialised the
per-example gradients they are weighed directly; a layer without a positions rule reruns its own
weight-gradient rule on the rescaled cotangent, ``backward(res, c ⊙ d_y)`` (a parameter gradient
is linear in the output cotangent and a sum over examples). No per-example gradient is
materialised where the norm has a cheaper route, and cotangents are not propagated a second time.

**The noise** ``z`` comes from ``fbp.gaussian_noise.normal``: bitwise ``jax.random.normal`` under
``jax.threefry_partitionable(False)``, with the hash fused into the noisy mean instead of
materialised (the MLP's 2.9M entries with an SGD update: 6.8–8.3 ms against 9.8–11.0 ms, no
temporary memory); its docstring says why the guarantee is unchanged.

References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
    Bu, Wang, Zha & Karypis, "Differentially Private Optimization on Large Model at Small Cost",
    ICML 2023.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fbp import gaussian_noise, parallel, per_example
from fbp import telemetry as ftelemetry
from fbp.core import Layer, Loss, leaf_layers, map_leaf_params
from fbp.extensions import Extension
from fbp.nn.positions import assemble
from fbp.validation import InputError, check_fields, describe, is_concrete, require_key, require_number, typed_arguments


def _weights(norms, l2_clip, mask):
    """``min(1, C / ‖g_b‖)`` (times the sampling mask): 1 for a zero gradient, never NaN."""
    scale = jnp.where(norms > l2_clip, l2_clip / jnp.where(norms > 0, norms, 1), 1.0) if math.isfinite(l2_clip) \
        else jnp.ones_like(norms)
    return scale if mask is None else scale * mask.astype(scale.dtype)


def _require_mask(mask, x):
    """A sampling mask must select examples, not weigh them: bool, or exactly 0/1, one per example.

    Under a trace only the dtype and shape can be checked, so a non-bool mask must be concrete;
    it is returned as bool (a weight of 2 would double an example's contribution, and the
    sensitivity bound with it)."""
    if mask is None:
        return None
    batch = jax.tree_util.tree_leaves(x)[0].shape[0]
    shape, dtype = getattr(mask, "shape", None), getattr(mask, "dtype", None)
    if shape is None or dtype is None:
        mask = jnp.asarray(mask)
        shape, dtype = mask.shape, mask.dtype
    if tuple(shape) != (batch,):
        raise InputError("clipped_grad", f"mask must have one entry per example, shape ({batch},); got "
                                         f"{describe(mask)}")
    if jnp.issubdtype(dtype, jnp.bool_):
        return mask
    if not is_concrete(mask):
        raise InputError("clipped_grad", f"mask must be bool under jit (values cannot be checked there); got "
                                         f"{describe(mask)}. Pass mask.astype(bool) or a comparison such as "
                                         f"jnp.arange(B) < n")
    values = np.asarray(mask)
    if not np.isin(values, (0, 1)).all():
        odd = values[~np.isin(values, (0, 1))]
        raise InputError("clipped_grad", f"mask must hold only 0 and 1 (it selects examples; a weight would "
                                         f"change each example's contribution and the privacy bound); got "
                                         f"{odd[:3].tolist()}")
    return jnp.asarray(values != 0)


def _clipped(model, loss, l2_clip, params, x, y, *, mask=None, with_pred=False, **context):
    mask = _require_mask(mask, x)
    values, grads, per, _, _, pred = per_example.run(model, loss, params, x, y, mode="clip", with_pred=True,
                                                     **context)
    norms = _total_norms(per, values)
    c = _weights(norms, l2_clip, mask)

    def clipped(path, leaf, d_params):
        kept = per.get(path)
        return d_params if kept is None else _clipped_leaf(leaf, d_params, kept, c)

    out = values, map_leaf_params(model, grads, clipped), norms
    return (*out, pred) if with_pred else out


def _total_norms(per, values):
    """Each example's gradient norm over the whole model, from every leaf's squared norms."""
    return jnp.sqrt(sum((p["sq"] for p in per.values()), jnp.zeros(values.shape[:1], values.dtype)))


def _clipped_leaf(leaf: Layer, d_params, kept, c):
    """A leaf's ``Σ_b c_b ∇ℓ_b`` from what its probe kept in ``"clip"`` mode (module docstring)."""

    def weigh(per):
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(c.astype(g.dtype), g, 1), per)

    if "groups" in kept:  # weights used over positions: Xᵀ (c ⊙ G), or weigh what was materialised
        values = weigh(kept["rest"])
        for group, materialised in zip(kept["groups"], kept["per"], strict=True):
            values.update(group.weighted_sum(c) if materialised is None else weigh(materialised))
        return assemble(d_params, values)
    if "per" in kept:  # the norm's route materialised the per-example gradients: weigh them
        return weigh(kept["per"])
    d_y = jax.tree_util.tree_map(lambda g: g * c.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), kept["d_y"])
    return leaf.backward(kept["res"], d_y)[0]


@dataclasses.dataclass(frozen=True)
class ClippedGrad(Extension):
    """DP-SGD's clipped sum as an extension of the one pass, per leaf:
    ``q["clipped_grad"][path] = Σ_b min(1, C/‖g_b‖) g_b`` with ``‖g_b‖`` each example's norm over
    the whole model — the same book-keeping as ``clipped_grad`` (norms first, then ``Xᵀ(c ⊙ G)``).
    For a sampling mask or the noise, use ``clipped_grad`` / ``private_grad``.

    Args:
        l2_clip: ``C > 0`` (``inf`` clips nothing).
    """

    l2_clip: float = 1.0
    name: ClassVar[str] = "clipped_grad"
    needs: ClassVar[str] = "clip"

    def __post_init__(self):
        if self.l2_clip != math.inf:  # inf: clip nothing
            require_number("ClippedGrad", "l2_clip", self.l2_clip, low=0, low_open=True)

    def finalize(self, found, context):
        c = _weights(_total_norms(found, context.values), self.l2_clip, None)
        leaves = dict(leaf_layers(context.model))
        return {path: _clipped_leaf(leaves[path], context.leaf_grads[path], kept, c) for path, kept in found.items()}


@typed_arguments
def clipped_grad(model: Layer, loss: Loss, l2_clip: float, *, has_state: bool = False) -> Callable:
    """The sum of per-example gradients clipped to norm ``C``, in one backward pass (book-keeping:
    norms first, then ``Xᵀ (c ⊙ G)`` from what the backward already holds).

    Args:
        model: the network.
        loss: the loss.
        l2_clip: the clipping norm ``C > 0`` (``inf`` clips nothing).
        has_state: for models that keep state.

    Returns:
        ``f(params, x, y, *, key=None, mask=None) -> (values, grads, norms)``:
        ``grads = Σ_b min(1, C/‖g_b‖) g_b`` (a sum, not a mean), ``norms`` the per-example
        gradient norms ``(B,)`` before clipping, ``values`` the per-example losses. ``mask``
        (``(B,)`` bools, or exactly 0/1 outside ``jit``) drops padded examples (Poisson sampling
        under jit); any other value, shape or a non-bool mask under ``jit`` is refused.
    """
    l2_clip = require_number("clipped_grad", "l2_clip", l2_clip, low=0, low_open=True) \
        if l2_clip != math.inf else math.inf

    def body(params, x, y, *, key=None, mask=None, state=None):
        return _clipped(model, loss, l2_clip, params, x, y, mask=mask, key=key, state=state)

    return per_example.with_context(model, has_state, "fbp.privacy.clipped_grad", body)


@typed_arguments
def private_grad(model: Layer, loss: Loss, l2_clip: float, noise_multiplier: float, expected_batch_size: float, *,
                 has_state: bool = False) -> Callable:
    """``f(params, x, y, *, noise_key, key=None, mask=None) -> (values, grads, norms)``: DP-SGD's
    noisy mean ``(Σ_b clip(g_b) + σ C z) / B̄`` with ``z ~ N(0, I)`` drawn from ``noise_key`` (one
    independent draw per parameter leaf) — pass it to any optimizer as the gradient.

    Args:
        model: the network (BatchNorm in training mode is refused).
        loss: the loss; each example's value is its own loss.
        l2_clip: ``C``, the clipping norm.
        noise_multiplier: ``σ``: the noise's standard deviation is ``σ C``.
        expected_batch_size: ``B̄``, the divisor of the noisy sum (the expected Poisson batch size).
        has_state: for models that keep state.

    Returns:
        ``f(params, x, y, *, noise_key, key=None, mask=None) -> (values, grads, norms)``: per-example losses, the
        noisy mean gradient and the per-example gradient norms (before clipping); ``mask`` (``(B,)`` bools) leaves
        out a Poisson buffer's padding rows.
    """
    require_number("private_grad", "l2_clip", l2_clip, low=0, low_open=True)
    sigma = require_number("private_grad", "noise_multiplier", noise_multiplier, low=0)
    size = require_number("private_grad", "expected_batch_size", expected_batch_size, low=0, low_open=True)
    clip = clipped_grad(model, loss, l2_clip, has_state=has_state)

    def f(*args, noise_key, **kwargs):
        require_key("private_grad", noise_key, "noise_key")
        values, grads, norms = clip(*args, **kwargs)
        return values, gaussian_noise.noisy_mean(noise_key, grads, sigma * l2_clip, size), norms

    return f


# --------------------------------------------------------------------------- training (fit(privacy=...))
SAMPLING = ("poisson", "fixed")


@dataclasses.dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings for ``fit(..., privacy=DPSGD(l2_clip=1.0, noise_multiplier=1.1))``.

    ``fit``'s ``batch_size`` is the *expected* batch size ``B̄``; the sampling rate is
    ``q = B̄ / n`` and an epoch is ``n // B̄`` steps. ``sampling="poisson"`` (the analysed one):
    every example joins each step's batch independently with probability ``q``; under ``jit`` the
    batch is a fixed buffer of ``max_batch`` rows with a mask (the buffer holds ``B̄`` plus 6
    standard deviations; a draw larger than that — probability below 1e-9 — loses its extra
    examples). ``sampling="fixed"``: shuffled disjoint batches of ``B̄``, accounted as sampling
    without replacement (common practice, an approximation of what shuffling does). ``fit``
    records ``epsilon`` at ``delta`` after every epoch (``accountant`` "rdp" or "pld").

    Args:
        l2_clip: ``C``, the bound on each example's gradient norm.
        noise_multiplier: ``σ``: the noise added to the clipped sum is ``N(0, (σ C)²)``.
        delta: the δ that ``epsilon`` is reported at.
        sampling: ``"poisson"`` or ``"fixed"``.
        accountant: ``"rdp"`` or ``"pld"`` (``dp-accounting``'s accountants).
    """

    l2_clip: float
    noise_multiplier: float
    delta: float = 1e-5
    sampling: str = "poisson"
    accountant: str = "rdp"

    def __post_init__(self):
        check_fields(self)
        require_number("DPSGD", "l2_clip", self.l2_clip, low=0, low_open=True)
        require_number("DPSGD", "noise_multiplier", self.noise_multiplier, low=0)
        require_number("DPSGD", "delta", self.delta, low=0, low_open=True, high=1, high_open=True)
        if self.sampling not in SAMPLING:
            raise ValueError(f"DPSGD: sampling must be one of {SAMPLING}, got {self.sampling!r}")
        from fbp.accounting import ACCOUNTANTS

        if self.accountant not in ACCOUNTANTS or (self.sampling == "fixed" and self.accountant != "rdp"):
            raise ValueError(f"DPSGD: accountant must be one of {ACCOUNTANTS} ('rdp' for fixed sampling), "
                             f"got {self.accountant!r}")

    def epsilon(self, n: int, batch_size: int, steps: int) -> float:
        from fbp.accounting import epsilon

        return epsilon(self.noise_multiplier, batch_size / n, steps, self.delta, accountant=self.accountant,
                       dataset_size=n if self.sampling == "fixed" else None)


@typed_arguments
def max_batch(n: int, batch_size: int) -> int:
    """The buffer for a Poisson batch of expected size ``B̄``: ``B̄ + 6σ + 1`` (at most ``n``).

    Args:
        n: the data set's size.
        batch_size: ``B̄``, the expected batch size.

    Returns:
        The buffer's number of rows.
    """
    q = batch_size / n
    return min(n, math.ceil(batch_size + 6 * math.sqrt(n * q * (1 - q)) + 1))


@typed_arguments
def poisson_batch(key, n: int, rate: float, size: int):
    """``(idx, mask)``: each of ``n`` examples chosen with probability ``rate``; the chosen ones
    first (in index order) in a buffer of ``size`` rows, ``mask`` marking them.

    Args:
        key: a JAX key.
        n: the data set's size.
        rate: ``q``, each example's probability of being chosen.
        size: the buffer's rows (``max_batch``).

    Returns:
        ``(idx, mask)``: ``(size,)`` indices and ``(size,)`` bools.
    """
    chosen = jax.random.uniform(key, (n,)) < rate
    idx = jnp.argsort(~chosen, stable=True)[:size]
    return idx, chosen[idx]


@typed_arguments
def private_step(model: Layer, loss: Loss, optimizer, spec: DPSGD, n: int, batch_size: int, correct_count,
                 augment=None, *, telemetry=False, mesh=None):
    """The step ``fit`` runs under DP-SGD, with the signature of its plain step.

    Each step samples its batch (Poisson with rate ``batch_size / n``, padded to ``max_batch``
    rows and masked, or the shuffled batch), clips every example's gradient to ``spec.l2_clip``
    inside one backward pass, adds ``N(0, (σ C)²)`` noise to the sum and divides by
    ``batch_size``.

    With ``telemetry``, the statistics are those of the *clipped* pass: a first pass computes
    each example's norm, a second, instrumented one differentiates ``Σ_b c_b ℓ_b`` with the
    clipping weights ``c_b = min(1, C/‖g_b‖)`` held constant — its gradient is the clipped sum
    (equal to the one-pass book-keeping to float rounding), its cotangents and output statistics
    those of the examples actually drawn. Two passes instead of one; the statistics are not
    noised (they are not part of the private release).

    With ``mesh`` (``fbp.parallel.data_mesh``) the batch buffer, its mask and every
    per-example computation are split over the devices; the noise is drawn from the same keys,
    so the step equals the one-device step to float rounding.

    Args:
        model: the model.
        loss: the loss (reduced per example inside).
        optimizer: the ``GradientTransformation`` applied to the noisy gradient.
        spec: the ``DPSGD`` settings.
        n: the number of training examples.
        batch_size: the expected batch size.
        correct_count: ``fbp.steps.correct_count`` (masked rows are not counted).
        augment: an augmentation ``(key, x) -> x``, or ``None``.
        telemetry: ``False``, ``True`` or a selection of ``fbp.telemetry.STATS``.
        mesh: a device mesh for data parallelism, or ``None``.

    Returns:
        ``step(carry, x, y, batches, row, epoch_key, step_number) -> carry``; the carry's
        ``stats`` count the examples actually sampled this epoch (``"examples"``) and, with
        ``telemetry``, sum the per-layer statistics (``"layers"``).
    """
    from fbp.optim import apply_updates

    rate, size = batch_size / n, buffer_rows(n, batch_size, mesh)
    probed = ftelemetry.Instrumented.of(model, None, stats=None if telemetry is True else telemetry) \
        if telemetry else None

    def step(carry, x, y, batches, row, epoch_key, step_number):
        params, state, opt_state, loss_sum, correct, stats, first_loss = carry
        step_key = jax.random.fold_in(epoch_key, step_number)
        if spec.sampling == "poisson":
            idx, mask = poisson_batch(jax.random.fold_in(step_key, 1), n, rate, size)
        else:
            idx = batches[row]
            mask = jnp.ones(idx.shape, bool)
        key = step_key if model.needs_key else None
        xb = x[idx] if augment is None else augment(jax.random.fold_in(step_key, 3), x[idx])
        yb = y[idx]
        if mesh is not None:  # data parallel: each device clips its slice of the buffer
            xb, yb, mask = parallel.constrain_batch((xb, yb, mask), mesh)
        if probed is None:
            values, grads, _, pred = _clipped(model, loss, spec.l2_clip, params, xb, yb, mask=mask, with_pred=True,
                                              key=key, state=state)
        else:
            values, grads, pred, layer_stats = _clipped_pass(probed, model, loss, spec.l2_clip, params, xb, yb,
                                                             mask, key=key, state=state)
        noisy = gaussian_noise.noisy_mean(jax.random.fold_in(step_key, 2), grads,
                                          spec.noise_multiplier * spec.l2_clip, batch_size)
        updates, opt_state = optimizer.update(noisy, opt_state, params)
        weights = mask.astype(jnp.float32)
        batch_loss = jnp.sum(values.astype(jnp.float32) * weights)
        loss_sum = loss_sum + batch_loss
        first_loss = jnp.where(step_number == 0, batch_loss / jnp.maximum(jnp.sum(weights), 1), first_loss)
        correct = correct + correct_count(pred, yb, loss, where=mask).astype(jnp.int32)
        new_stats = {"examples": stats["examples"] + jnp.sum(weights)}
        if probed is not None:
            new_stats["layers"] = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), stats["layers"],
                                                         layer_stats)
        return carry._replace(params=apply_updates(params, updates), opt_state=opt_state, loss_sum=loss_sum,
                              correct=correct, first_loss=first_loss, stats=new_stats)

    return step


def buffer_rows(n: int, batch_size: int, mesh=None) -> int:
    """The rows of a training step's Poisson buffer: ``max_batch``, rounded up to a multiple of
    the mesh's device count (each device takes an equal slice).

    Args:
        n: the data set's size.
        batch_size: the expected batch size.
        mesh: a device mesh, or ``None``.

    Returns:
        The rows.

    Raises:
        ValueError: no multiple of the device count fits in ``n`` rows.
    """
    rows = max_batch(n, batch_size)
    if mesh is None:
        return rows
    devices = mesh.devices.size
    rounded = -(-rows // devices) * devices
    if rounded > n:
        raise ValueError(f"fit: DP-SGD on {devices} devices needs a Poisson buffer of {rounded} rows (a multiple of "
                         f"the device count), more than the {n} training examples; use fewer devices or a smaller "
                         f"batch_size")
    return rounded


def _clipped_pass(probed, model, loss, l2_clip, params, x, y, mask, **context):
    """Telemetry of the clipped pass: the norms from a first pass, then the instrumented pass
    of ``Σ_b c_b ℓ_b`` (``private_step``'s docstring). ``(values, clipped sum, pred, stats)``."""
    values, _, per, _, _ = per_example.run(model, loss, params, x, y, mode="norms", **context)
    norms = jnp.sqrt(sum(per.values(), jnp.zeros(values.shape[:1], values.dtype)))
    c = _weights(norms, l2_clip, mask)
    _, grads, pred, _, stats = probed.run(loss, params, x, y, weights=c, **context)
    return values, grads, pred, stats
