"""BackPACK peers for ``bench_curvature.py`` (used only when torch and BackPACK are installed).

From fbp's parameters (the same weights) each returns zero-argument callables on CPU tensors:
``torch-step`` (forward, loss, backward, SGD update), and BackPACK's ``DiagGGNMC`` (one
sample), ``DiagGGNExact`` and ``KFAC`` (one sample) — each one extended backward, the quantity
BackPACK computes for the same loss.
"""

from __future__ import annotations

import numpy as np
import torch
from backpack import backpack, extend
from backpack.extensions import KFAC, DiagGGNExact, DiagGGNMC
from torch_models import _t, cnn_nchw, mlp


def extended(name, params, x, y):
    """``(model, loss_fn, xt, yt)``: fbp's weights in the torch network, both extended for
    BackPACK, and the batch as CPU tensors (NCHW for the CNN)."""
    build = mlp if name == "mlp" else cnn_nchw
    xt = _t(x) if name == "mlp" else _t(np.asarray(x).reshape(-1, 28, 28, 1)).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return extend(build(params)), extend(torch.nn.CrossEntropyLoss(reduction="mean")), xt, yt


def candidates(name, params, x, y, lr=1e-2):
    model, loss_fn, xt, yt = extended(name, params, x, y)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt), yt)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        return loss.detach()

    def extension(make):
        def run():
            model.zero_grad(set_to_none=True)
            with backpack(make()):
                loss_fn(model(xt), yt).backward()
            return [getattr(p, attr) for p in model.parameters() for attr in ("diag_ggn_mc", "diag_ggn_exact", "kfac")
                    if hasattr(p, attr)]
        return run

    return {"torch-step": step, "backpack-ggn-mc": extension(lambda: DiagGGNMC(mc_samples=1)),
            "backpack-ggn": extension(DiagGGNExact), "backpack-kfac": extension(lambda: KFAC(mc_samples=1))}


def agreement(name, params, x, y, ours) -> float:
    """The largest relative difference between BackPACK's exact GGN diagonal and ``ours`` (fbp's
    leaves, each layer's ``b`` before its ``w``), compared as sorted values per parameter (the
    layouts differ: torch's (out, in) and OIHW kernels, the CNN's permuted first Linear)."""
    theirs = [p.detach().numpy() for p in candidates(name, params, x, y)["backpack-ggn"]()]
    ours = [np.asarray(a) for a in ours]
    ours = [a for pair in zip(ours[1::2], ours[0::2]) for a in pair]  # (w, b) per layer, as torch
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        a, b = np.sort(a.ravel()), np.sort(b.ravel())
        worst = max(worst, float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-30)))
    return worst
