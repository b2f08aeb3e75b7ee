"""Cockpit (PyTorch + BackPACK) on bench_diagnostics.py's 3C3D and batches, for side-by-side timing.

Imported by ``bench_diagnostics.py`` only when ``cockpit-for-pytorch`` is installed (then
uninstall the CUDA-only torchvision wheel: it breaks ``import cockpit`` under CPU torch). The
network is DeepOBS's ``cifar10_3c3d`` as Cockpit benchmarks it (PyTorch's own initialisation:
only the time is compared), the same 16 batches, SGD; each call runs the 16 steps, with a
fresh ``Cockpit`` of the configuration (every step, or every 16th).
"""

from __future__ import annotations

import numpy as np
import torch
from backpack import extend
from cockpit import Cockpit
from cockpit.utils import schedules
from cockpit.utils.configuration import configuration

torch.set_num_threads(2)


def _c3d3():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, padding=1),
        torch.nn.Conv2d(64, 96, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, padding=1),
        torch.nn.Conv2d(96, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, padding=1),
        torch.nn.Flatten(), torch.nn.Linear(1152, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10))


def cockpit_calls(params, xs, ys) -> dict:
    """``{"cockpit plain", "cockpit economy", "cockpit business", "cockpit full/16"}``: 16 steps each."""
    del params  # the same architecture, torch's initialisation (time only)
    x = torch.from_numpy(np.asarray(xs, np.float32)).permute(0, 1, 4, 2, 3).contiguous()  # NHWC -> NCHW
    y = torch.from_numpy(np.asarray(ys, np.int64))
    model, loss_fn = extend(_c3d3()), extend(torch.nn.CrossEntropyLoss())
    each = torch.nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def steps(label=None, every=1):
        cockpit = None if label is None else Cockpit(
            model.parameters(), quantities=configuration(label, track_schedule=schedules.linear(every)))
        for step in range(x.shape[0]):
            opt.zero_grad()
            out = model(x[step])
            loss = loss_fn(out, y[step])
            if cockpit is None:
                loss.backward()
            else:
                info = {"batch_size": x.shape[1], "individual_losses": each(out, y[step]).detach(), "loss": loss}
                with cockpit(step, info=info):
                    loss.backward(create_graph=cockpit.create_graph(step))
            opt.step()
        return loss.detach()

    return {"cockpit plain": steps, "cockpit economy": lambda: steps("economy"),
            "cockpit business": lambda: steps("business"), "cockpit full/16": lambda: steps("full", 16)}
