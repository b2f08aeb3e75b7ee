"""A run's diagnostics as TensorBoard scalars and histograms (``tensorboardX``, an optional extra:
``pip install "fbp[diagnostics]"``).

Every number becomes a scalar at its step (``alpha``, ``noise_scale/b_simple``,
``update_ratio/layers/0``, ...); the per-example gradient histograms become TensorBoard
histograms from their counts and edges (``add_histogram_raw``: nothing is re-binned), and the
findings of the whole run a text entry.
"""

from __future__ import annotations

import numpy as np

from fbp.diagnostics.findings import findings


def _flat(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif np.ndim(value) == 0 and value is not None:
        out[prefix] = float(value)


def write(result, logdir) -> int:
    """Write a run's diagnostics to a TensorBoard event file in ``logdir``.

    Args:
        result: a ``FitResult`` with diagnostics, or its ``diagnostics`` dict.
        logdir: the directory (created if needed).

    Returns:
        How many scalars were written.

    Raises:
        ImportError: tensorboardX is not installed (with the command that installs it).
        ValueError: a run without diagnostics.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError as missing:
        raise ImportError('fbp.diagnostics.tensorboard needs tensorboardX: pip install "fbp[diagnostics]"') \
            from missing
    record = result if isinstance(result, dict) else result.diagnostics
    if not record:
        raise ValueError("fbp.diagnostics.tensorboard: the run has no diagnostics: train with fit(..., "
                         "diagnostics='economy')")
    written = 0
    with SummaryWriter(str(logdir)) as writer:
        for step in sorted(record):
            entry, scalars = record[step], {}
            _flat("", {k: v for k, v in entry.items() if not k.startswith("grad_hist")}, scalars)
            for tag, value in scalars.items():
                if np.isfinite(value):
                    writer.add_scalar(tag, value, step)
                    written += 1
            hist = entry.get("grad_hist_1d")
            if isinstance(hist, dict):
                counts, edges = np.asarray(hist["counts"], float), np.asarray(hist["edges"], float)
                centres = (edges[:-1] + edges[1:]) / 2
                total = counts.sum()
                if total > 0:
                    writer.add_histogram_raw("grad_hist_1d", min=float(edges[0]), max=float(edges[-1]),
                                             num=float(total), sum=float(counts @ centres),
                                             sum_squares=float(counts @ centres ** 2),
                                             bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(),
                                             global_step=step)
        text = "\n".join(f"* {f.message} (rule: {f.rule})" for f in findings(record)) or "no finding"
        writer.add_text("findings", text, max(record))
    return written
