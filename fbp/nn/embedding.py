"""Embedding: integer ids to learned vectors.

``y[..., :] = table[ids[...], :]``. The backward scatters the output cotangent back onto the
rows that were read: ``d_table = zeros.at[ids].add(d_y)`` (rows read twice get both
contributions). Integer ids have no cotangent; ``d_x`` is ``None``, so an Embedding is the
first layer of a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp

from fbp.core import InputError, Layer, describe
from fbp.nn import init as initializers


@dataclasses.dataclass(frozen=True)
class Embedding(Layer):
    """A ``(vocab, features)`` table looked up by integer ids of any shape.
    Params ``{"table": (vocab, features)}``; default init N(0, 1), as PyTorch."""

    vocab: int
    features: int
    embedding_init: Callable = initializers.normal(1.0)
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab", "features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Embedding: {name} must be a positive int, got {value!r}")

    def __repr__(self) -> str:
        return f"Embedding(vocab={self.vocab}, features={self.features})"

    def _check_ids(self, x):
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.integer):
            raise InputError(repr(self), f"input must be integer ids in [0, {self.vocab}), received {describe(x)}")

    def init(self, key, x):
        self._check_ids(x)
        return {"table": self.embedding_init(key, (self.vocab, self.features), jnp.dtype(self.dtype))}

    def forward(self, params, x):
        self._check_ids(x)
        table = params.get("table") if hasattr(params, "get") else None
        if table is None or tuple(table.shape) != (self.vocab, self.features):
            raise InputError(repr(self), f"expected shape ({self.vocab}, {self.features}), received "
                                         f"{describe(table) if table is not None else 'nothing'}", param="table")
        return table[x], (x, table)

    def backward(self, res, d_y):
        ids, table = res
        d_table = jnp.zeros(table.shape, d_y.dtype).at[ids.reshape(-1)].add(d_y.reshape(-1, table.shape[1]))
        return {"table": d_table.astype(table.dtype)}, None
