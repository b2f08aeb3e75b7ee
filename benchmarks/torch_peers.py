"""PyTorch eager peers for ``bench_sequence.py`` (used only when torch is installed).

Each builder takes the fbp parameters (so that all frameworks start from the same weights and
report the same loss) and returns ``(step, forward)``: a full SGD step (forward, loss, backward,
update) and the forward alone, both on NumPy-backed CPU tensors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own spelling


def _tensor(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _sgd_step(params, loss_fn, lr):
    def step():
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
        return loss.detach()

    def forward():
        with torch.no_grad():
            return loss_fn()

    return step, forward


def lstm(params, x, y, lr):
    """``torch.nn.LSTM`` (its fused CPU kernels) -> last step -> Linear, cross-entropy."""
    cell, head = params[0], params[2]
    hidden = cell["w_h"].shape[0]
    rnn = torch.nn.LSTM(x.shape[-1], hidden, batch_first=True)
    linear = torch.nn.Linear(hidden, head["w"].shape[1])
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(_tensor(cell["w_x"]).T)
        rnn.weight_hh_l0.copy_(_tensor(cell["w_h"]).T)
        rnn.bias_ih_l0.copy_(_tensor(cell["b"]))
        rnn.bias_hh_l0.zero_()
        linear.weight.copy_(_tensor(head["w"]).T)
        linear.bias.copy_(_tensor(head["b"]))
    xt, yt = _tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))

    def loss_fn():
        out, _ = rnn(xt)
        return F.cross_entropy(linear(out[:, -1]), yt)

    return _sgd_step([*rnn.parameters(), *linear.parameters()], loss_fn, lr)


def transformer(params, x, y, lr, heads):
    """Pre-LN block with ``F.scaled_dot_product_attention`` -> mean over time -> Linear."""
    block, head = params[0], params[2]
    a = block["attention"]
    t = {"ln1_s": block["ln1"]["scale"], "ln1_b": block["ln1"]["b"], "ln2_s": block["ln2"]["scale"],
         "ln2_b": block["ln2"]["b"], "w_in": block["mlp_in"]["w"], "b_in": block["mlp_in"]["b"],
         "w_out": block["mlp_out"]["w"], "b_out": block["mlp_out"]["b"], "w": head["w"], "b": head["b"],
         **{f"{n}_{m}": a[f"{n}_{m}"] for n in "wb" for m in "qkvo"}}
    t = {k: _tensor(v).requires_grad_() for k, v in t.items()}
    xt, yt = _tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    b, n, d = x.shape

    def loss_fn():
        h = F.layer_norm(xt, (d,), t["ln1_s"], t["ln1_b"], eps=1e-5)
        q, k, v = ((h @ t[f"w_{m}"] + t[f"b_{m}"]).view(b, n, heads, d // heads).transpose(1, 2) for m in "qkv")
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        h = xt + o @ t["w_o"] + t["b_o"]
        m = F.layer_norm(h, (d,), t["ln2_s"], t["ln2_b"], eps=1e-5)
        h = h + F.gelu(m @ t["w_in"] + t["b_in"], approximate="tanh") @ t["w_out"] + t["b_out"]
        return F.cross_entropy(h.mean(1) @ t["w"] + t["b"], yt)

    return _sgd_step(list(t.values()), loss_fn, lr)
