"""The benchmark's MLP and CNN as PyTorch modules on fbp's weights (for the peers that need torch).

``mlp`` and ``cnn`` take the fbp params (the same weights in every framework); ``cnn`` reads
fbp's flat 28×28×1 input and flattens in NHWC order, as fbp does. ``cnn_nchw`` is the same CNN
built from stock modules only (for BackPACK's second-order extensions): it takes NCHW input and
its first Linear's rows are permuted to torch's CHW flattening.
"""

from __future__ import annotations

import numpy as np
import torch


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




def cnn_nchw(params):
    first = {"w": np.asarray(params[8]["w"]).reshape(7, 7, 64, -1).transpose(2, 0, 1, 3).reshape(7 * 7 * 64, -1),
             "b": params[8]["b"]}
    return torch.nn.Sequential(_conv(params[1]), torch.nn.ReLU(), torch.nn.MaxPool2d(2), _conv(params[4]),
                               torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), _linear(first),
                               torch.nn.ReLU(), _linear(params[10]))
