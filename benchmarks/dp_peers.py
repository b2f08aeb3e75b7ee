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

# Opacus's hooks fire on module outputs when the input does not require a gradient (as here)
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _linear(p):
    layer = torch.nn.Linear(*p["w"].shape)
    with torch.no_grad():
        layer.weight.copy_(_t(p["w"]).T)
        layer.bias.copy_(_t(p["b"]))
    return layer


def _conv(p):
    kh, kw, c_in, c_out = p["w"].shape
    layer = torch.nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))  # SAME for odd kernels
    with torch.no_grad():
        layer.weight.copy_(_t(p["w"]).permute(3, 2, 0, 1))
        layer.bias.copy_(_t(p["b"]))
    return layer


def mlp(params):
    layers = []
    for p in params:
        if p:
            layers += [_linear(p), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


class _NHWC(torch.nn.Module):
    """fbp's flat 28×28×1 input -> NCHW; flatten in NHWC order, as fbp's Flatten."""

    def forward(self, x):
        return x.view(x.shape[0], 1, 28, 28)


class _FlattenNHWC(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def cnn(params):
    return torch.nn.Sequential(_NHWC(), _conv(params[1]), torch.nn.ReLU(), torch.nn.MaxPool2d(2), _conv(params[4]),
                               torch.nn.ReLU(), torch.nn.MaxPool2d(2), _FlattenNHWC(), _linear(params[8]),
                               torch.nn.ReLU(), _linear(params[10]))


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
