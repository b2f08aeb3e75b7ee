"""Rematerialisation: keep a block's input, recompute its forward in the backward pass.

``Remat(block)`` runs ``block`` forward as usual but keeps only what it needs to run it again —
its input ``x``, its params, its state and its key — instead of every residual inside the
block. The backward recomputes the block's forward from those (the same key: dropout replays
the same mask) and runs the block's own backward on the fresh residuals. Memory for a stack
of ``K`` rematerialised blocks falls from all residuals of all blocks to the ``K`` block inputs
plus one block's residuals at a time, for one more forward pass.

**Keeping the recomputation where it belongs.** Written naively, the recomputation is the
same expression as the forward, on the same operands, so XLA merges the two (common
subexpression elimination) or its scheduler hoists the recomputation up beside the forward —
either way every residual is live again and memory is not saved. ``jax.checkpoint`` shows the
second effect on XLA:CPU, and a ``lax.optimization_barrier`` does not prevent it, even one that
ties the saved operands to the cotangent: XLA:CPU expands barriers into scheduling hints early,
after which the recomputation is again an exact copy of the forward and is merged with it.

Here the recomputation and the block's backward run inside a ``lax.cond`` that takes the
block's output cotangent as an operand, with the same function in both branches and a
predicate read from the saved params (``p[0] == p[0]``, false only for a NaN, and then the
other branch computes the same thing). XLA does not move computations out of a conditional's
branches or merge them with computations outside, and it cannot run the conditional before
its operands exist — that is, before the backward has reached this block. The predicate reads
the residuals, not the cotangent, so the backward stays linear in the cotangent and can be
transposed (``J v`` for GGN-vector products). Values are untouched: gradients equal those
without ``Remat`` up to how XLA fuses the operations inside the branch (measured: bit-equal
under ``jit`` on XLA:CPU, within 1e-13 relative eagerly).
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax

from fbp.core import InputError, Layer, at_path, run_forward


@dataclasses.dataclass(frozen=True)
class Remat(Layer):
    """``block`` with its forward recomputed in the backward pass (module docstring).

    The same outputs and gradients, residual memory of its input only. Params ``{"block": ...}``
    (paths ``block/0/w``), state likewise.

    Args:
        block: the layer (usually a ``Serial``) to recompute.
    """

    block: Layer
    contextual = True

    def children(self):
        return {"block": self.block}

    def replace_children(self, kids):
        return dataclasses.replace(self, **kids)

    @property
    def has_state(self):
        return self.block.has_state

    @property
    def needs_key(self):
        return self.block.needs_key

    def init(self, key, x):
        with at_path("block"):
            return {"block": self.block.init(key, x)}

    def init_state(self, params):
        return {"block": self.block.init_state(params["block"])}

    def next_state(self, state, res):
        return None if state is None else {"block": res[-1]}

    def forward(self, params, x, *, state=None, key=None, train=False):
        if not hasattr(params, "keys") or set(params.keys()) != {"block"}:
            got = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
            raise InputError(repr(self), f"expects params as a dict with the key 'block', received {got}. Did you "
                                         f"init a different model?")
        inner_state = None if state is None else state["block"]
        with at_path("block"):
            y, inner = run_forward(self.block, params["block"], x, state=inner_state, key=key, train=train)
        new_state = None if state is None else self.block.next_state(inner_state, inner)
        return y, (x, params["block"], inner_state, key, train, new_state)

    def backward(self, res, d_y):
        x, params, state, key, train, _ = res

        static = {}  # what the backward returns that is no array (a probe's book-keeping: keys, shapes)

        def recompute_and_backward(operands):
            x, params, state, key, d_y = operands
            _, inner = run_forward(self.block, params, x, state=state, key=key, train=train)
            leaves, static["tree"] = jax.tree_util.tree_flatten(self.block.backward(inner, d_y))
            static["kept"] = [None if isinstance(a, jax.Array) else a for a in leaves]
            return [a for a in leaves if isinstance(a, jax.Array)]

        # the predicate reads the residuals, not d_y: the backward stays linear in d_y (J v by
        # linear_transpose, fbp.curvature's GGN-vector products), and the cond still waits for d_y
        probe = next((a.reshape(-1)[0] for a in jax.tree_util.tree_leaves((params, x)) if a.size), None)
        operands = (x, params, state, key, d_y)
        arrays = iter(recompute_and_backward(operands) if probe is None else
                      lax.cond(probe == probe, recompute_and_backward, recompute_and_backward, operands))
        leaves = [next(arrays) if a is None else a for a in static["kept"]]
        d_params, d_x = jax.tree_util.tree_unflatten(static["tree"], leaves)
        return {"block": d_params}, d_x
