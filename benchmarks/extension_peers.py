"""BackPACK's one extended backward with ``BatchL2Grad``, ``Variance`` and ``DiagGGNMC`` (one
sample) for ``bench_extensions.py`` (used only when torch and BackPACK are installed): PyTorch
eager on CPU, the same weights (``torch_models``) and batch as fbp's call."""

from __future__ import annotations

import numpy as np
import torch
from backpack import backpack, extend
from backpack.extensions import BatchL2Grad, DiagGGNMC, Variance
from torch_models import _t, cnn_nchw, mlp


def backpack_call(name, params, x, y):
    """A zero-argument callable: forward, loss and one backward extended with the three quantities."""
    build = mlp if name == "mlp" else cnn_nchw
    xt = _t(x) if name == "mlp" else _t(np.asarray(x).reshape(-1, 28, 28, 1)).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    model = extend(build(params))
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))

    def run():
        model.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad(), Variance(), DiagGGNMC(mc_samples=1)):
            loss_fn(model(xt), yt).backward()
        return [(p.batch_l2, p.variance, p.diag_ggn_mc) for p in model.parameters()]

    return run
