"""Training diagnostics from the backward pass: a cockpit for JAX, inside the jitted step.

Every quantity is an extension of the one-pass engine (``fbp.value_and_grad(..., extensions=...)``)
or a function of the update (``fbp.diagnostics.step``), each with its formula and reference in
its docstring:

* gradient noise: ``NoiseScale`` (McCandlish et al., 2018), ``NormTest``, ``InnerTest``,
  ``OrthoTest`` (Byrd et al., 2012; Bollapragada et al., 2018), ``GradientSNR`` (Liu et al.,
  2020), ``GradNorm`` — ``fbp.diagnostics.moments``;
* curvature: ``GGNTrace`` (exact or Hutchinson), ``GGNMaxEigenvalue`` (Lanczos), ``TICDiag``
  (Thomas et al., 2020) — ``fbp.diagnostics.curvature``;
* histograms of per-example gradient elements, 1-D and against the parameters —
  ``fbp.diagnostics.histograms``;
* the step: α, update size and ratio, distance from the start — ``fbp.diagnostics.step``.

In training: ``fbp.fit(..., diagnostics="economy" | "business" | "full" | [names],
diagnostics_every=N)``; the results are in ``FitResult.diagnostics`` (``{step: {quantity: value
or {layer path: value}}}``) — ``fbp.diagnostics.training`` says what each preset holds.
``fbp.diagnostics.findings(result.diagnostics)`` turns them into advice, each finding with the
rule that fired; ``fbp.diagnostics.plot(result)`` draws the dashboard;
``fbp.diagnostics.tensorboard.write(result, logdir)`` writes TensorBoard scalars and histograms.
"""

from fbp.diagnostics.curvature import GGNMaxEigenvalue, GGNTrace, TICDiag, lanczos_top
from fbp.diagnostics.findings import Finding, findings
from fbp.diagnostics.histograms import GradHistogram1d, GradHistogram2d
from fbp.diagnostics.moments import GradientSNR, GradNorm, InnerTest, NoiseScale, NormTest, OrthoTest
from fbp.diagnostics.plot import plot
from fbp.diagnostics.step import alpha, distance, update_ratio, update_size
from fbp.diagnostics.training import NAMES, PRESETS, DiagnosticsState, Watch, watch

__all__ = ["NAMES", "PRESETS", "DiagnosticsState", "Finding", "GGNMaxEigenvalue", "GGNTrace", "GradHistogram1d",
           "GradHistogram2d", "GradNorm", "GradientSNR", "InnerTest", "NoiseScale", "NormTest", "OrthoTest",
           "TICDiag", "Watch", "alpha", "distance", "findings", "lanczos_top", "plot", "update_ratio", "update_size",
           "watch"]
