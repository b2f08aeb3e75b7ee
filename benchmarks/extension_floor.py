"""The floor for bench_extensions.py's MLP: the same quantities written by hand in plain JAX.

No engine, no probes, no layers: the MLP's forward and backward as bare matmuls, and per Dense
layer exactly the products the quantities need — ``Xᵀ G`` (the gradient), ``(X²)ᵀ (G²)``
(the per-example squares, for the variance), ``Xᵀ (c ⊙ G)`` (the clipped sum) and the ghost
norms ``‖x_b‖² ‖g_b‖²``. Its time over the hand-written plain step is what this CPU allows for
"norms + variance + clipped gradient", whatever library computes them; fbp's ``nvc`` is
measured against it.
"""

import jax
import jax.numpy as jnp


def _forward(params, x):
    """Every Dense layer's input, and the logits (params: bench's Serial of Dense, ReLU)."""
    dense = [p for p in params if p]
    inputs, h = [], x
    for i, p in enumerate(dense):
        inputs.append(h)
        z = h @ p["w"] + p["b"]
        h = jnp.maximum(z, 0) if i < len(dense) - 1 else z
    return dense, inputs, h


def _backward(dense, inputs, logits, y):
    """Every Dense layer's output cotangent for the per-example softmax cross-entropy losses."""
    g = jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1])
    outs = [None] * len(dense)
    for i in reversed(range(len(dense))):
        outs[i] = g
        if i:
            g = (g @ dense[i]["w"].T) * (inputs[i] > 0)
    return outs


def plain(params, x, y):
    """The gradient of the mean loss, by hand."""
    dense, inputs, logits = _forward(params, x)
    outs = _backward(dense, inputs, logits, y)
    b = x.shape[0]
    return [{"w": a.T @ g / b, "b": g.sum(0) / b} for a, g in zip(inputs, outs, strict=True)]


def norms_variance_clipped(params, x, y, l2_clip=1.0):
    """The gradient, the per-example norms, the variance and the clipped sum, by hand."""
    dense, inputs, logits = _forward(params, x)
    outs = _backward(dense, inputs, logits, y)
    b = x.shape[0]
    sq = sum(jnp.sum(a * a, 1) * jnp.sum(g * g, 1) + jnp.sum(g * g, 1) for a, g in zip(inputs, outs, strict=True))
    norms = jnp.sqrt(sq)
    c = jnp.minimum(1.0, l2_clip / jnp.maximum(norms, 1e-30))
    out = []
    for a, g in zip(inputs, outs, strict=True):
        w, bias = a.T @ g, g.sum(0)
        gc = g * c[:, None]
        out.append({"grad": {"w": w / b, "b": bias / b},
                    "variance": {"w": jnp.maximum((a * a).T @ (g * g) / b - (w / b) ** 2, 0),
                                 "b": jnp.maximum((g * g).sum(0) / b - (bias / b) ** 2, 0)},
                    "clipped": {"w": a.T @ gc, "b": gc.sum(0)}})
    return norms, out
