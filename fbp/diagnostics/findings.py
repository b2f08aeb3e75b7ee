"""Plain-language findings from a run's diagnostics, each with the rule that produced it.

Every rule reads ``FitResult.diagnostics`` over a window of the last ``window`` recorded steps
(medians: robust to the noisy steps every mini-batch quantity has). The rules, and why:

* ``step-too-large`` — median α > 0.5: the steps land well past the minimum along their own
  direction (α = 0 is the minimum, 1 the same height on the other side); lower the learning
  rate. ``step-too-small`` — median α < −0.5: the steps stop short, far from the minimum along
  their direction (−1 is not moving); raise it. (Cockpit's α; Schneider et al., 2021.)
* ``loss-rising`` — the loss's median over the last window above its median over the first
  recorded steps (a tenth of them, at most 5: the loss at the start) while the median α is
  positive: the run is getting worse and its steps overshoot — the learning rate is too large
  (a diverging run saturates and its α stays moderate, so the rising loss is the stronger
  evidence there).
* ``beyond-stability`` — median of ``learning_rate × λ_max`` > 2, with λ_max the GGN's top
  eigenvalue: plain gradient descent on a quadratic with that curvature diverges along its top
  direction (the edge of stability: Cohen et al., 2021); lower the rate below ``2/λ_max``.
* ``batch-below-noise-scale`` — ``B_simple`` over the window > the batch size (the ratio of
  the mean unbiased ``tr Σ`` to the mean unbiased ``|G|²``, as McCandlish et al. average them:
  one step's ratio is noisy and its denominator can be negative): larger batches would
  still cut the gradient's noise almost linearly, so a larger batch (and learning rate) trains in
  fewer steps (McCandlish et al., 2018). ``batch-above-noise-scale`` — batch > 10 × ``B_simple``:
  beyond the noise scale extra examples add little per step; a smaller batch costs less. Both
  are read only when no step-size finding fired: the noise scale's advice assumes a well-tuned
  step (McCandlish et al. relate it to the best learning rate), so fix the step first.
* ``layer-frozen`` / ``layer-racing`` — a layer's median update-to-parameter ratio below 1e-5
  or above 1e-1: that layer barely moves (vanishing gradients, a too small rate) or its
  weights are being replaced each step (a too large rate for that layer; folklore: ~1e-3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ALPHA_HIGH, ALPHA_LOW = 0.5, -0.5
STABILITY = 2.0
NOISE_FACTOR = 10.0
RATIO_LOW, RATIO_HIGH = 1e-5, 1e-1


class Finding(NamedTuple):
    """One finding: its ``name``, the ``message`` a user can act on, and the ``rule`` that fired."""

    name: str
    message: str
    rule: str


def _series(record: dict, window: int, *keys) -> np.ndarray:
    steps = sorted(record)[-window:]
    out = []
    for s in steps:
        value = record[s]
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        if value is not None and np.ndim(value) == 0 and math.isfinite(float(value)):
            out.append(float(value))
    return np.asarray(out)


def findings(diagnostics: dict, window: int = 200) -> list[Finding]:
    """The findings for a run (module docstring).

    Args:
        diagnostics: ``FitResult.diagnostics`` (``{step: {quantity: value}}``).
        window: how many of the last recorded steps the medians cover.

    Returns:
        The findings that fire, in the order of the module docstring.
    """
    out = []
    alpha = _series(diagnostics, window, "alpha")
    if alpha.size:
        med = float(np.median(alpha))
        if med > ALPHA_HIGH:
            out.append(Finding("step-too-large", f"step size too large: median α {med:.2f} over the last {alpha.size} "
                                                 f"steps (the steps overshoot the minimum along their direction): "
                                                 f"lower the learning rate", f"median α > {ALPHA_HIGH}"))
        elif med < ALPHA_LOW:
            out.append(Finding("step-too-small", f"step size too small: median α {med:.2f} over the last {alpha.size} "
                                                 f"steps (the steps stop far short of the minimum along their "
                                                 f"direction): raise the learning rate", f"median α < {ALPHA_LOW}"))
        loss = _series(diagnostics, len(diagnostics), "loss")
        if not out and loss.size >= 4:  # (once step-too-large fired, this says nothing new)
            first = float(np.median(loss[:max(1, min(5, loss.size // 10))]))  # the loss at the start
            last = float(np.median(loss[-window:]))
            if last > first and med > 0:
                out.append(Finding("loss-rising", f"step size too large: the loss rose from {first:.3g} to {last:.3g} "
                                                  f"while the steps overshoot (median α {med:.2f} > 0): lower the "
                                                  f"learning rate", "median loss (last window) > median loss (first "
                                                                    "tenth, ≤ 5 steps) and median α > 0"))
    top, rate = _series(diagnostics, window, "ggn_max_eigenvalue"), _series(diagnostics, window, "learning_rate")
    if top.size and rate.size == top.size:
        sharp = float(np.median(top * rate))
        if sharp > STABILITY:
            out.append(Finding("beyond-stability", f"learning rate beyond the stability limit: lr × λ_max has median "
                                                   f"{sharp:.2f} > 2 (λ_max {np.median(top):.3g}): keep the rate "
                                                   f"below 2/λ_max ≈ {2 / np.median(top):.3g}",
                               f"median(learning_rate × ggn_max_eigenvalue) > {STABILITY}"))
    trace, signal = _series(diagnostics, window, "noise_scale", "trace_cov"), \
        _series(diagnostics, window, "noise_scale", "grad_sq")
    batch = _series(diagnostics, window, "batch")
    step_size = any(f.name in ("step-too-large", "step-too-small", "loss-rising") for f in out)
    if trace.size and batch.size and np.mean(signal) > 0 and not step_size:
        scale, b = float(np.mean(trace) / np.mean(signal)), float(np.median(batch))
        if scale > b:
            out.append(Finding("batch-below-noise-scale",
                               f"batch smaller than the noise scale: B_simple ≈ {scale:.0f} > batch {b:.0f}: a larger "
                               f"batch (with a larger rate) would train in fewer steps",
                               "mean trace_cov / mean grad_sq > batch"))
        elif 0 < scale * NOISE_FACTOR < b:
            out.append(Finding("batch-above-noise-scale",
                               f"batch much larger than the noise scale: B_simple ≈ {scale:.0f} < batch {b:.0f} / "
                               f"{NOISE_FACTOR:.0f}: a smaller batch would cost less per step for almost the same "
                               f"progress", f"batch > {NOISE_FACTOR:.0f} × mean trace_cov / mean grad_sq"))
    layers = sorted({p for s in diagnostics.values() for p in s.get("update_ratio", {}).get("layers", {})})
    for path in layers:
        ratio = _series(diagnostics, window, "update_ratio", "layers", path)
        if ratio.size:
            med = float(np.median(ratio))
            if med < RATIO_LOW:
                out.append(Finding("layer-frozen", f"layer {path} barely moves: median update/parameter ratio "
                                                   f"{med:.1e}", f"median update_ratio < {RATIO_LOW:g}"))
            elif med > RATIO_HIGH:
                out.append(Finding("layer-racing", f"layer {path} is rewritten every step: median update/parameter "
                                                   f"ratio {med:.2f}", f"median update_ratio > {RATIO_HIGH:g}"))
    return out
