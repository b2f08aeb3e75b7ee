"""The dashboard: one figure of a run's diagnostics, with its findings underneath.

Panels (each empty, saying so, when its quantities were not recorded): the loss; α with the
bands of ``fbp.diagnostics.findings``; the gradient noise scale (running, as the findings read
it) against the batch size; the three tests; the curvature (GGN trace, top eigenvalue, TIC);
per-layer gradient norms; per-layer update-to-parameter ratios and the distance from the
start; the last recorded step's histogram of per-example gradient elements; and the 2-D
gradient/parameter histogram (or the per-layer gradient signal-to-noise ratio).
"""

from __future__ import annotations

import numpy as np

from fbp.diagnostics.findings import ALPHA_HIGH, ALPHA_LOW, findings


def _get(entry, *keys):
    for k in keys:
        entry = entry.get(k) if isinstance(entry, dict) else None
    return entry


def _line(record, *keys):
    steps = [s for s in sorted(record) if np.ndim(_get(record[s], *keys)) == 0 and _get(record[s], *keys) is not None]
    return np.asarray(steps), np.asarray([float(_get(record[s], *keys)) for s in steps])


def _layers(record, quantity):
    return sorted({p for e in record.values() for p in (_get(e, quantity, "layers") or {})})


def _empty(ax, title):
    ax.set_title(title)
    ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")


def plot(result, path=None, window: int = 200):
    """The dashboard of ``result`` (a ``FitResult`` with diagnostics, or its ``diagnostics`` dict).

    Args:
        result: the run.
        path: save the figure there too (PNG, PDF, ... by its suffix), or ``None``.
        window: the findings' window (``fbp.diagnostics.findings``).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: a run without diagnostics.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    record = result if isinstance(result, dict) else result.diagnostics
    if not record:
        raise ValueError("fbp.diagnostics.plot: the run has no diagnostics: train with fit(..., diagnostics='economy')")
    fig, axes = plt.subplots(3, 3, figsize=(15, 12))
    ax = axes.ravel()
    _series_panel(ax[0], record, "loss", "loss", log=True)
    s, a = _line(record, "alpha")
    if a.size:
        ax[1].scatter(s, a, s=4, alpha=0.5)
        ax[1].axhspan(ALPHA_LOW, ALPHA_HIGH, color="green", alpha=0.08)
        ax[1].axhline(0, color="k", lw=0.5)
        ax[1].set_ylim(-1.5, 2.5)
        ax[1].set_title(f"α (median {np.median(a[-window:]):.2f}; green: neither too small nor too large)")
    else:
        _empty(ax[1], "α")
    s, tr = _line(record, "noise_scale", "trace_cov")
    _, g2 = _line(record, "noise_scale", "grad_sq")
    if tr.size:
        k = np.arange(1, tr.size + 1)
        running = np.cumsum(tr) / np.maximum(np.cumsum(g2), 1e-30)  # ratio of the running means
        ax[2].plot(s, running, label="B_simple (running)")
        _, b = _line(record, "batch")
        if b.size:
            ax[2].axhline(np.median(b), color="k", ls="--", label="batch size")
        ax[2].set_yscale("symlog")
        ax[2].legend()
        ax[2].set_title(f"gradient noise scale (last {min(window, k[-1])} steps: "
                        f"{np.mean(tr[-window:]) / np.mean(g2[-window:]):.0f})")
    else:
        _empty(ax[2], "gradient noise scale")
    _multi(ax[3], record, [("norm_test",), ("inner_test",), ("ortho_test",)], "tests (θ, θ, ν)")
    _multi(ax[4], record, [("ggn_trace", "total"), ("ggn_max_eigenvalue",), ("tic_diag",)], "curvature")
    _per_layer(ax[5], record, "grad_norm", "gradient norm per layer")
    _per_layer(ax[6], record, "update_ratio", "update / parameter ratio per layer")
    s, dist = _line(record, "distance", "total")
    if dist.size:
        twin = ax[6].twinx()
        twin.plot(s, dist, color="k", lw=1, label="distance from start")
        twin.legend(loc="lower right")
    last = [e for _, e in sorted(record.items()) if isinstance(e.get("grad_hist_1d"), dict)]
    if last:
        h = last[-1]["grad_hist_1d"]
        edges = np.asarray(h["edges"])
        ax[7].bar(edges[:-1], np.asarray(h["counts"]), width=np.diff(edges), align="edge")
        ax[7].set_yscale("log")
        ax[7].set_title("per-example gradient elements (last step)")
    else:
        _empty(ax[7], "per-example gradient elements")
    last2 = [e for _, e in sorted(record.items()) if isinstance(e.get("grad_hist_2d"), dict)]
    if last2:
        h = last2[-1]["grad_hist_2d"]
        eg, ep = np.asarray(h["edges_grad"]), np.asarray(h["edges_param"])
        ax[8].pcolormesh(eg, ep, np.log1p(np.asarray(h["counts"])).T)
        ax[8].set_xlabel("per-example gradient")
        ax[8].set_ylabel("parameter")
        ax[8].set_title("gradient vs parameter (log counts, last step)")
    else:
        _per_layer(ax[8], record, "gradient_snr", "gradient signal-to-noise per layer")
    for a in ax[:7]:
        a.set_xlabel("step")
    found = findings(record, window)
    text = "\n".join(f"• {f.message}   [rule: {f.rule}]" for f in found) or "• no finding: every rule is quiet"
    fig.text(0.01, 0.005, text, ha="left", va="bottom", fontsize=9, wrap=True)
    fig.tight_layout(rect=(0, 0.03 + 0.018 * max(len(found), 1), 1, 1))
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _series_panel(ax, record, key, title, log=False):
    s, v = _line(record, key)
    if not v.size:
        return _empty(ax, title)
    ax.plot(s, v, lw=1)
    if log and np.all(v > 0):
        ax.set_yscale("log")
    ax.set_title(title)
    return None


def _multi(ax, record, keys, title):
    drawn = False
    for k in keys:
        s, v = _line(record, *k)
        if v.size:
            ax.plot(s, v, lw=1, label=k[0])
            drawn = True
    if not drawn:
        return _empty(ax, title)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    ax.set_title(title)
    return None


def _per_layer(ax, record, quantity, title):
    paths = _layers(record, quantity)
    if not paths:
        return _empty(ax, title)
    for p in paths:
        s, v = _line(record, quantity, "layers", p)
        ax.plot(s, v, lw=1, label=p)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return None
