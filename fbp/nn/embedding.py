"""Embedding: integer ids to learned vectors.

``y[..., :] = table[ids[...], :]``. The backward scatters the output cotangent back onto the
rows that were read: ``d_table = zeros.at[ids].add(d_y)`` (rows read twice get both
contributions). Integer ids have no cotangent; ``d_x`` is ``None``, so an Embedding is the
first layer of a model.

Ids must lie in ``[0, vocab)``. On concrete ids (outside ``jit``) one outside raises
``InputError``. Under ``jit``/``vmap`` the ids cannot be inspected, and JAX's
gather would silently clamp them (reading the last row, negative ones wrapping) while the
scatter drops them; instead such an id reads a row of **NaN** — so the loss turns NaN and
``fbp.train.fit`` stops with a ``stop_reason`` — and contributes no gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fbp.core import InputError, Layer, check_params, describe, is_concrete
from fbp.nn import init as initializers
from fbp.validation import check_fields


@dataclasses.dataclass(frozen=True)
class Embedding(Layer):
    """A ``(vocab, features)`` table looked up by integer ids of any shape.
    Params ``{"table": (vocab, features)}``; default init N(0, 1), as PyTorch.

    Args:
        vocab: the number of ids; an id outside ``[0, vocab)`` raises (eagerly) or gives a NaN
            row (under jit).
        features: the width of each row.
        embedding_init: initializer of the table (default N(0, 1)).
        dtype: the table's dtype (default float32).

    Shapes:
        ``ids (...) -> y (..., features)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own
    linear_in_params = True  # projections onto a direction: the lookup in it (core.Layer)

    vocab: int
    features: int
    embedding_init: Callable = initializers.normal(1.0)
    dtype: str = "float32"

    def __post_init__(self):
        check_fields(self)
        for name in ("vocab", "features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Embedding: {name} must be a positive int, got {value!r}")
        try:
            floating = jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(f"Embedding: dtype must name a floating dtype such as 'float32', got {self.dtype!r}")

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
        check_params(repr(self), params, {"table": (self.vocab, self.features)}, x)
        table = params["table"]
        valid = (x >= 0) & (x < self.vocab)
        if is_concrete(valid):
            if not bool(np.all(valid)):
                bad = np.argwhere(~np.asarray(valid))
                index = tuple(int(i) for i in bad[0])
                found = np.asarray(x)[index] if is_concrete(x) else "an id"
                raise InputError(repr(self), f"ids must lie in [0, {self.vocab}); found {found} at index {index} "
                                             f"({len(bad)} such ids in all). Check the tokenizer's vocabulary size")
            return table[x], (x, table)
        y = jnp.where(valid[..., None], table[jnp.clip(x, 0, self.vocab - 1)], jnp.nan).astype(table.dtype)
        return y, (jnp.where(valid, x, self.vocab), table)  # out of range: an index the scatter drops

    def backward(self, res, d_y):
        ids, table = res
        d_table = jnp.zeros(table.shape, d_y.dtype).at[ids.reshape(-1)].add(d_y.reshape(-1, table.shape[1]),
                                                                             mode="drop")
        return {"table": d_table.astype(table.dtype)}, None

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): the tangent table's rows, ``d_table[ids]`` (ids do not vary)."""
        ids, _ = res
        return jnp.take(d_params["table"], ids, axis=0, mode="fill", fill_value=0)

    def backward_tangent(self, res, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): zero — the backward depends on neither the table nor the ids' values."""
        return {"table": jnp.zeros_like(d_params["table"])}, None

    def per_example_grads(self, res, d_y):
        """Per-example rule (``fbp.per_example``): each example's rows scattered into a table of
        its own, ``(B, vocab, features)``."""
        ids, _ = res
        ids2, g3 = ids.reshape(ids.shape[0], -1), d_y.reshape(d_y.shape[0], -1, d_y.shape[-1])
        one = jax.vmap(lambda i, g: jnp.zeros((self.vocab, g.shape[-1]), g.dtype).at[i].add(g, mode="drop"))
        return {"table": one(ids2, g3)}

    def per_example_sq_norms(self, res, d_y):
        r"""``(sq, how)``: each example's squared gradient norm ``(B,)`` without its table when
        that is cheaper — the ghost norm ``Σ_{t,s} [id_t = id_s] (g_t · g_s)`` over the example's
        ``T`` positions when ``T² < vocab`` — else from ``per_example_grads``."""
        ids, _ = res
        ids2, g3 = ids.reshape(ids.shape[0], -1), d_y.reshape(d_y.shape[0], -1, d_y.shape[-1])
        t = ids2.shape[1]
        if t * t < self.vocab:
            same = (ids2[:, :, None] == ids2[:, None, :]).astype(g3.dtype)
            return jnp.sum(same * jnp.einsum("btd,bsd->bts", g3, g3), axis=(1, 2)), f"ghost norm (T={t})"
        table = self.per_example_grads(res, d_y)["table"]
        return jnp.sum(jnp.square(table), axis=(1, 2)), f"materialised (T={t})"
