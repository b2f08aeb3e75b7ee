"""BackPACK's one extended backward with ``BatchL2Grad``, ``Variance`` and ``DiagGGNMC`` (one
sample) for ``bench_extensions.py`` (used only when torch and BackPACK are installed): PyTorch
eager on CPU, the same weights (``torch_models``) and batch as fbp's call."""

from __future__ import annotations

from backpack import backpack
from backpack.extensions import BatchL2Grad, DiagGGNMC, Variance
from curvature_peers import extended


def backpack_call(name, params, x, y):
    """A zero-argument callable: forward, loss and one backward extended with the three quantities."""
    model, loss_fn, xt, yt = extended(name, params, x, y)

    def run():
        model.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad(), Variance(), DiagGGNMC(mc_samples=1)):
            loss_fn(model(xt), yt).backward()
        return [(p.batch_l2, p.variance, p.diag_ggn_mc) for p in model.parameters()]

    return run
