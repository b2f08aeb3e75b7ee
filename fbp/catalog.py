"""Every built-in rule with a sample input: what ``python -m fbp check`` verifies.

The test suite runs the same catalogue, so a new layer or loss is verified by adding one line.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fbp import check, credit, losses, nn


def layers() -> list[tuple[nn.Layer, tuple[int, ...]]]:
    """(layer, input shape) for every built-in layer; see ``contextual_layers`` too."""
    return [
        (nn.Dense(7), (5, 4)),
        (nn.Dense(3, use_bias=False), (2, 3, 4)),
        (nn.Identity(), (5, 4)),
        (nn.Sigmoid(), (5, 4)),
        (nn.Tanh(), (5, 4)),
        (nn.ReLU(), (5, 4)),
        (nn.LeakyReLU(negative_slope=0.1), (5, 4)),
        (nn.ELU(alpha=1.5), (5, 4)),
        (nn.GELU(approximate=True), (5, 4)),
        (nn.GELU(approximate=False), (5, 4)),
        (nn.Softplus(), (5, 4)),
        (nn.SiLU(), (5, 4)),
        (nn.Softmax(), (5, 4)),
        (nn.Softmax(axis=0), (5, 4)),
        (nn.LogSoftmax(), (5, 4)),
        (nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(3), nn.LogSoftmax()), (6, 4)),
        (nn.Conv1D(4, 3, strides=2), (2, 9, 3)),
        (nn.Conv2D(4, 3), (2, 6, 5, 3)),
        (nn.Conv2D(6, (3, 2), strides=2, padding="VALID", dilation=(1, 2), feature_group_count=3), (2, 7, 8, 3)),
        (nn.ConvTranspose2D(3, 3, strides=2), (2, 4, 3, 2)),
        (nn.MaxPool2D(2), (2, 6, 5, 3)),
        (nn.MaxPool2D(3, strides=2, padding="SAME"), (2, 7, 6, 2)),
        (nn.AvgPool2D(2), (2, 6, 4, 3)),
        (nn.AvgPool2D(3, strides=1, padding="SAME"), (2, 5, 4, 2)),
        (nn.GlobalAvgPool(), (2, 4, 3, 5)),
        (nn.Flatten(), (2, 3, 2, 2)),
        (nn.Reshape((3, -1)), (2, 12)),
        (nn.LayerNorm(), (3, 4, 6)),
        (nn.GroupNorm(2), (2, 3, 3, 4)),
        (nn.Residual(nn.Serial(nn.Dense(4), nn.Tanh())), (3, 4)),
        (nn.Residual(nn.Dense(2), projection=nn.Dense(2)), (3, 4)),
        (nn.Parallel(nn.Dense(2), nn.Sigmoid()), (3, 4)),
        (nn.Remat(nn.Serial(nn.Dense(5), nn.Tanh(), nn.LayerNorm(), nn.Dense(3))), (3, 4)),
        (nn.SimpleRNN(4), (2, 5, 3)),
        (nn.LSTM(4), (2, 5, 3)),
        (nn.GRU(4), (2, 5, 3)),
        (nn.LastStep(), (2, 5, 3)),
        (nn.MultiHeadAttention(2), (2, 5, 8)),
        (nn.MultiHeadAttention(2, causal=True), (2, 5, 8)),
        (nn.TransformerBlock(2, 16), (2, 5, 8)),
        (nn.LearnedPositionalEmbedding(8), (2, 5, 4)),
        (nn.SinusoidalPositionalEmbedding(), (2, 5, 4)),
        (nn.Serial(nn.LSTM(6), nn.GRU(5), nn.LastStep(), nn.Dense(2)), (2, 4, 3)),
        # rules that deviate from the gradient by design, checked against their own equations
        (nn.ScaleGradient(0.5), (5, 4)),
        (nn.GradientReversal(2.0), (5, 4)),
        (nn.StopGradient(), (5, 4)),
        (nn.MapCotangent(jnp.tanh, name="tanh"), (5, 4)),
        (nn.Sign(), (5, 4)),
        (nn.Round(ste="hardtanh"), (5, 4)),
        (nn.QuantizeWeights(nn.Dense(3), nn.Sign(ste="identity")), (5, 4)),
        (credit.SignSymmetry(nn.Conv2D(4, 3)), (2, 6, 5, 3)),
    ]


def contextual_layers() -> list[tuple[nn.Layer, tuple[int, ...], dict]]:
    """(layer, input shape, forward context) for layers with state, randomness or integer input.

    ``context`` may hold ``train`` and ``key``; ``"state": True`` asks for ``init_state``;
    ``"vocab": V`` asks for integer ids in ``[0, V)`` as input.
    """
    return [
        (nn.BatchNorm(), (8, 5), {"train": True, "state": True}),
        (nn.BatchNorm(), (2, 3, 3, 4), {"train": False, "state": True}),
        (nn.Dropout(0.3), (4, 6), {"train": True, "key": 7}),
        (nn.Embedding(7, 3), (2, 5), {"vocab": 7}),
        (nn.Serial(nn.Conv2D(4, 3), nn.BatchNorm(), nn.ReLU(), nn.Dropout(0.25), nn.MaxPool2D(2), nn.Flatten(),
                   nn.Dense(3)), (4, 6, 6, 2), {"train": True, "state": True, "key": 3}),
        (credit.FeedbackAlignment(nn.Dense(5)), (6, 4), {"state": True}),
        (credit.FeedbackAlignment(nn.Conv1D(3, 3)), (2, 7, 2), {"state": True}),
    ]


def _labels(key, n, c):
    return jax.random.randint(key, (n,), 0, c)


def losses_cases(key) -> list[tuple[losses.Loss, jax.Array, jax.Array]]:
    """``(loss, pred, target)`` for every built-in loss, including every reduction and target form.

    Args:
        key: the random key the predictions and targets are drawn from.

    Returns:
        A list of cases for ``fbp.check.loss``.
    """
    k1, k2, k3 = jax.random.split(key, 3)
    z = 2 * jax.random.normal(k1, (6, 4))
    t = jax.random.normal(k2, (6, 4))
    probs = jax.random.uniform(k1, (6, 4), minval=0.05, maxval=0.95)
    bits = (jax.random.uniform(k2, (6, 4)) > 0.5).astype(jnp.float32)
    signs = 2 * bits - 1
    onehot = jax.nn.one_hot(_labels(k3, 6, 4), 4)
    soft = jax.nn.softmax(jax.random.normal(k3, (6, 4)))
    cases = [
        (losses.MSE(), z, t), (losses.MSE(reduction="sum"), z, t),
        (losses.MSE(reduction="none"), z, t), (losses.MAE(), z, t), (losses.Huber(delta=1.0), z, t),
        (losses.Huber(delta=0.3, reduction="sum"), z, t),
        (losses.BinaryCrossEntropy(from_logits=True), z, bits),
        (losses.BinaryCrossEntropy(from_logits=True), z, probs),
        (losses.BinaryCrossEntropy(), probs, bits),
        (losses.CategoricalCrossEntropy(from_logits=True), z, onehot),
        (losses.CategoricalCrossEntropy(from_logits=True), z, soft),
        (losses.CategoricalCrossEntropy(from_logits=True), z, _labels(k3, 6, 4)),
        (losses.CategoricalCrossEntropy(), jax.nn.softmax(z / 4), onehot),
        (losses.Hinge(), z, signs),
        (losses.MulticlassHinge(), z, _labels(k3, 6, 4)),
        (losses.CategoricalCrossEntropy(from_logits=True, reduction="none"), z, onehot),
    ]
    return cases


def models() -> list[tuple[nn.Layer, losses.Loss, tuple[int, ...], int]]:
    """(model, loss, input shape, number of classes) for whole-network checks."""
    return [
        (nn.Serial(nn.Dense(16), nn.Tanh(), nn.Dense(16), nn.ReLU(), nn.Dense(5)),
         losses.CategoricalCrossEntropy(from_logits=True), (8, 6), 5),
        (nn.Serial(nn.Dense(2), nn.Sigmoid(), nn.Dense(1), nn.Sigmoid()), losses.MSE(), (4, 2), 0),
        (credit.direct_feedback_alignment(nn.Serial(nn.Dense(8), nn.Tanh(), nn.Dense(6), nn.ReLU(), nn.Dense(3)),
                                          jax.ShapeDtypeStruct((8, 5), jnp.float32)),
         losses.CategoricalCrossEntropy(from_logits=True), (8, 5), 3),
    ]


def _normal(key, shape):
    """A float32 sample input drawn by NumPy from ``key`` (no random-number kernel is compiled for
    every case's shape): a standard normal pushed 0.1 away from 0, where ReLU-like rules have their
    kink, so that float32 finite differences (step ``ε^(1/3) ≈ 5e-3``) never straddle it."""
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    z = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(z + 0.1 * np.sign(z), jnp.float32)


def checks(*, dtype=jnp.float64, jit: bool = False, key=None) -> list[tuple[str, Callable[[], check.Report]]]:
    """Every check of the catalogue, as thunks.

    Calling a thunk builds the case's sample input and parameters and runs its check. ``run``
    calls them all; the test suite runs one per test, so the cases spread over its workers.

    Args:
        dtype: the precision to check in.
        jit: run the rules under ``jax.jit``.
        key: the random key for inputs and parameters (``PRNGKey(0)`` if ``None``).

    Returns:
        A list of ``(subject, thunk)``; each thunk returns a ``fbp.check.Report``.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    out = []
    for i, (layer, shape) in enumerate(layers()):
        out.append((f"{layer!r} [input {shape}]",
                    functools.partial(_check_layer, layer, shape, jax.random.fold_in(key, i), dtype, jit)))
    for i, (layer, shape, opts) in enumerate(contextual_layers()):
        mode = "train" if opts.get("train") else "eval"
        what = f"ids {shape}" if "vocab" in opts else f"input {shape}"
        out.append((f"{layer!r} [{mode}, {what}]", functools.partial(_check_contextual, layer, shape, opts,
                                                                      jax.random.fold_in(key, 500 + i), dtype, jit)))
    for loss, pred, target in losses_cases(jax.random.fold_in(key, 1000)):
        out.append((f"{loss!r} [{_targets(target)} {tuple(target.shape)}]",
                    functools.partial(check.loss, loss, pred, target, dtype=dtype, jit=jit)))
    for i, (model, loss, shape, classes) in enumerate(models()):
        out.append((f"{model!r} with {loss!r} [input {shape}]",
                    functools.partial(_check_model, model, loss, shape, classes, jax.random.fold_in(key, 2000 + i),
                                      dtype, jit)))
    return [(name, functools.partial(_named, name, thunk)) for name, thunk in out]


def _named(name: str, thunk: Callable[[], check.Report]) -> check.Report:
    """The report with the case's name (rule and sample) as its subject, so every row is unique."""
    report = thunk()
    return dataclasses.replace(report, subject=f"{report.subject.split(': ', 1)[0]}: {name}")


def _targets(target) -> str:
    """How a loss case's targets are written: labels, 0/1, or soft (probabilities, real values)."""
    t = np.asarray(target)
    if np.issubdtype(t.dtype, np.integer):
        return "labels"
    return "0/1 targets" if np.isin(t, (0.0, 1.0)).all() else "real targets"


def run(*, dtype=jnp.float64, jit: bool = False, key=None) -> list[check.Report]:
    """Check every built-in rule (``python -m fbp check`` runs this).

    Args:
        dtype: the precision to check in.
        jit: run the rules under ``jax.jit``.
        key: the random key for inputs and parameters (``PRNGKey(0)`` if ``None``).

    Returns:
        One ``fbp.check.Report`` per case.
    """
    return [thunk() for _, thunk in checks(dtype=dtype, jit=jit, key=key)]


def _check_layer(layer, shape, key, dtype, jit):
    k_x, k_p = jax.random.split(key)
    x = _normal(k_x, shape)
    return check.layer(layer, layer.init(k_p, x), x, dtype=dtype, jit=jit)


def _check_contextual(layer, shape, opts, key, dtype, jit):
    k_x, k_p, k_s = jax.random.split(key, 3)
    if "vocab" in opts:
        x = jax.random.randint(k_x, shape, 0, opts["vocab"])
    else:
        x = 1 + 2 * _normal(k_x, shape)
    params = layer.init(k_p, x)
    state = None
    if opts.get("state"):  # a non-trivial running state
        state = jax.tree_util.tree_map(lambda a: a + 0.5 * jax.random.uniform(k_s, a.shape), layer.init_state(params))
    return check.layer(layer, params, x, state=state, train=opts.get("train", False),
                       key=jax.random.PRNGKey(opts["key"]) if "key" in opts else None, dtype=dtype, jit=jit)


def _check_model(model, loss, shape, classes, key, dtype, jit):
    k_x, k_y, k_p = jax.random.split(key, 3)
    x = _normal(k_x, shape)
    y = _labels(k_y, shape[0], classes) if classes else jax.random.uniform(k_y, (shape[0], 1))
    params = model.init(k_p, x)
    state = model.init_state(params) if model.has_state else None
    return check.model(model, loss, params, x, y, state=state, dtype=dtype, jit=jit)
