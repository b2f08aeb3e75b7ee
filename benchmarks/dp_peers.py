"""PyTorch peers for ``bench_per_example.py`` (used only when torch, Opacus and BackPACK are installed).

From fbp's parameters (the same weights) each builder returns zero-argument callables on CPU
tensors:

* ``opacus-hooks``: Opacus's ``GradSampleModule`` (per-example gradients from hooks) with its
  ``DPOptimizer`` — one DP-SGD step (clip, sum, noise, SGD);
* ``opacus-ghost``: Opacus's ghost clipping (``GradSampleModuleFastGradientClipping``,
  ``DPOptimizerFastGradientClipping``, ``DPLossFastGradientClipping``): norms in a first
  backward, the clipped sum in a second — one DP-SGD step;
* ``backpack-norms``: BackPACK's ``BatchL2Grad`` — the per-example squared gradient norms of
  every parameter, from one extended backward.

Only the MLP and the CNN of the benchmark are built (the layer types Opacus and BackPACK both
support); the rest of the workloads are JAX-only.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from backpack import backpack, extend
from backpack.extensions import BatchL2Grad
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch_models import _t, cnn, mlp  # noqa: F401  (bench_per_example reads dp_peers.mlp / .cnn)

# Opacus's hooks fire on module outputs when the input does not require a gradient (as here)
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def candidates(build, params, x, y, clip, sigma, lr=1e-2):
    xt, yt = _t(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    batch = xt.shape[0]

    hooks = GradSampleModule(build(params))
    opt_h = DPOptimizer(torch.optim.SGD(hooks.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=clip,
                        expected_batch_size=batch)

    def opacus_hooks():
        opt_h.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(hooks(xt), yt).backward()
        opt_h.step()

    ghost = GradSampleModuleFastGradientClipping(build(params), max_grad_norm=clip, use_ghost_clipping=True)
    opt_g = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=lr), noise_multiplier=sigma,
                                            max_grad_norm=clip, expected_batch_size=batch)
    criterion = DPLossFastGradientClipping(ghost, opt_g, torch.nn.CrossEntropyLoss(reduction="mean"))

    def opacus_ghost():
        criterion(ghost(xt), yt).backward()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    extended = extend(build(params))
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="mean"))

    def backpack_norms():
        extended.zero_grad(set_to_none=True)
        with backpack(BatchL2Grad()):
            loss_fn(extended(xt), yt).backward()
        return torch.sqrt(sum(p.batch_l2 for p in extended.parameters())) * batch  # per-example losses

    return {"opacus-hooks": opacus_hooks, "opacus-ghost": opacus_ghost, "backpack-norms": backpack_norms}
