"""A run's telemetry: the per-epoch history ``fit`` records, and the gradient-flow plot of it.

``fit(..., telemetry=True)`` sums each step's statistics (``fbp.telemetry``) over an epoch and
``record_epoch`` appends the epoch's means; ``plot_gradient_flow`` draws one line per layer.
Both are public as ``fbp.telemetry.record_epoch`` and ``fbp.telemetry.plot_gradient_flow``.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from fbp.core import Layer, leaf_layers
from fbp.validation import typed_arguments


@typed_arguments
def record_epoch(stat_history: dict, stat_sum, steps: int) -> None:
    """Append one epoch's statistics to the history, in place.

    Args:
        stat_history: ``{path: {name: [per-epoch values]}}``, extended in place.
        stat_sum: the statistics summed over the epoch's steps.
        steps: the number of steps summed.

    Returns:
        ``None``; ``stat_history`` gets the epoch's means (sums for ``nonfinite``).
    """
    for path, stats in jax.device_get(stat_sum).items():
        for name, value in stats.items():
            stat_history.setdefault(path, {}).setdefault(name, []).append(
                float(value) if name == "nonfinite" else float(value) / steps)


def leaf_paths(model: Layer) -> list[str]:
    """The paths the statistics are keyed by, in forward order.

    Args:
        model: the model.

    Returns:
        The leaf layers' paths (``"0"``, ``"1/block/0"``, ...).
    """
    return [path for path, _ in leaf_layers(model)]


@typed_arguments
def plot_gradient_flow(history: dict[str, dict[str, Any]], *, stat: str = "d_out_norm", ax=None, log: bool = True,
                       model: Layer | None = None):
    """Plot one statistic per layer over epochs from ``FitResult.telemetry``, one line per layer path.

    With the default ``d_out_norm`` this is gradient flow: vanishing gradients show as lines
    falling toward the input layers, exploding ones as lines rising.

    Args:
        history: ``FitResult.telemetry``: ``{path: {name: [per-epoch values]}}``.
        stat: the statistic to plot (a name in ``STATS``).
        ax: a matplotlib axes to draw on; a new figure if ``None``.
        log: a logarithmic y axis.
        model: the model the history was recorded from: each line is then labelled with its
            layer's path and class (``"2 Dense"``), else with the path alone.

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: ``history`` is empty (``fit`` ran without ``telemetry=True``).
    """
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("plot_gradient_flow: no telemetry recorded (fit(..., telemetry=True))")
    fig, ax = (plt.subplots(figsize=(7, 4)) if ax is None else (ax.figure, ax))
    kinds = {} if model is None else {path: type(leaf).__name__ for path, leaf in leaf_layers(model)}
    for path, stats in history.items():
        if stat not in stats:
            continue
        values = stats[stat]
        label = " ".join(part for part in (path or "<root>", kinds.get(path, "")) if part)
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(stat)
    ax.set_title(f"{stat} per layer (path), epoch means")
    ax.legend(fontsize="small", ncol=max(1, math.ceil(len(history) / 12)),
              title="layer (path and class)" if kinds else "layer (path)")
    fig.tight_layout()
    return fig
