"""What each layer family gives each extension of the one-pass engine — generated, not written.

For every case of the catalogue (``fbp.catalog``: every built-in family, with a sample input)
and every built-in extension, the route that family's own declarations give: read from the
probes at trace time (``fbp.per_example.routes``), never from a table kept by hand. Each case
runs as ``Serial(layer, Flatten(), Dense(2))`` under a cross-entropy loss, in training mode; a
cell lists the routes of the case's own leaves (the head is left out).

The routes:

* per-example gradients: ``outer products over positions`` (a Dense-like weight's
  ``per_example_positions``), ``the layer's per_example_grads``, or ``vmap of the layer's
  rules`` (its forward and backward on each example alone — always available);
* norms and the clipped sum: ``norms ‖x‖‖g‖`` (one position), ``ghost norm`` or
  ``materialised`` (several positions: the cheaper), or the materialised gradients' norms;
* ``Σ (∇ℓ_b)²`` (and the GGN diagonals, which square each column's gradients the same way):
  ``(x²)ᵀ(g²)`` at one position, else squares of materialised per-example gradients;
* Kronecker factors: ``A ⊗ G`` per Dense-like weight (its kernels listed), the exact GGN
  diagonal for every other parameter;
* GGN-vector products: ``J v`` forward on the family's tangent rule (``fbp.linear_pass``), or
  by transposing the rules' backward where it has none — the batch's GGN either way, so
  families that mix the batch are no exception;
* telemetry's statistics: every leaf, without needing the examples kept apart;
* alignment angles: where a family's rule deviates from its gradient by design and it has an
  exact VJP beside the rule (``fbp.credit``, ``fbp.nn.hooks``);
* ``refused``: the family mixes the examples of a batch (``fbp.independence``), so no
  per-example quantity exists.

``tests/test_capabilities.py`` checks every cell that is not refused against a computation with
JAX autodiff of the plain forward, in float64; ``docs/guides/capabilities.md`` is this table
(a test regenerates it and compares).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fbp import catalog, nn
from fbp.core import InputError, Layer, leaf_layers
from fbp.deviation import exact_model
from fbp.linear_pass import has_tangent
from fbp.losses import CategoricalCrossEntropy
from fbp.per_example import routes

LOSS = CategoricalCrossEntropy(from_logits=True)
# extension name -> the probe mode whose route it takes (the GGN diagonals square each column's
# per-example gradients as "sgs" does; Variance reads "sgs" and the gradient)
EXTENSIONS = {"grads": "grads", "grad_norms": "norms", "sum_grad_squared": "sgs", "variance": "sgs",
              "clipped_grad": "clip", "diag_ggn": "sgs", "diag_ggn_mc": "sgs", "kronecker_factors": "kfac-expand",
              "ggn_vector_product": "backward", "stats": None, "alignment": "exact"}


def cases() -> list[tuple[str, Layer, tuple, dict]]:
    """``(name, model, input shape, context)`` for every catalogue case: the case's layer under a
    ``Flatten`` and ``Dense(2)`` head; ``context`` as ``catalog.contextual_layers`` (``train`` is
    dropped: the engine trains)."""
    out = [(repr(layer), layer, shape, {}) for layer, shape in catalog.layers()]
    out += [(repr(layer), layer, shape, ctx) for layer, shape, ctx in catalog.contextual_layers()]
    seen = set()  # the catalogue's train and eval cases of one layer are one case here: the engine trains
    return [(name, nn.Serial(layer, nn.Flatten(), nn.Dense(2)), shape, ctx) for name, layer, shape, ctx in out
            if not (name in seen or seen.add(name))]


def inputs(model: Layer, shape: tuple, ctx: dict, dtype=jnp.float64):
    """The inputs of one case.

    Args:
        model: the case's model.
        shape: its input shape.
        ctx: its context (``vocab`` for ids, ``key`` for a random layer).
        dtype: the inputs' and params' floating dtype.

    Returns:
        ``(params, state, x, y, key)``: the params and state, inputs from ``shape`` (ids for an
        embedding), two-class labels, and a key when the model needs one.
    """
    k_x, k_p, k_y = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.randint(k_x, shape, 0, ctx["vocab"]) if "vocab" in ctx else \
        jax.random.normal(k_x, shape, dtype)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                    model.init(k_p, x))
    state = model.init_state(params) if model.has_state else None
    y = jax.random.randint(k_y, (shape[0],), 0, 2)
    return params, state, x, y, (jax.random.PRNGKey(ctx.get("key", 1)) if model.needs_key else None)


def _route(extension: str, model: Layer, params, state, x, y, key, traced: dict) -> str:
    mode = EXTENSIONS[extension]
    if mode is None:
        return "every leaf (batch statistics)"
    if mode == "backward":  # the case's own layer decides: the head (Flatten, Dense) has tangent rules
        if has_tangent(model):
            return "J v forward (tangent rules), Jᵀ H J v (the batch's GGN)"
        return "J v by transposing the backward, Jᵀ H J v (the batch's GGN)"
    if mode == "exact":
        return "no rule that deviates" if exact_model(model) is None else "rule vs exact VJP, same residuals"
    if mode not in traced:  # one trace per probe mode (four extensions read "sgs")
        try:
            traced[mode] = routes(model, LOSS, params, x, y, mode=mode, state=state, key=key)
        except InputError as error:
            if "mixes" not in str(error) and "independ" not in str(error):
                raise
            traced[mode] = None
    found = traced[mode]
    if found is None:
        return "refused: mixes the examples of a batch"
    head = {p for p, _ in leaf_layers(model) if p.startswith(("1", "2"))}
    own = {p: how for p, how in sorted(found.items()) if p not in head}
    if mode.startswith("kfac"):
        own = {p: ("A ⊗ G (" + ", ".join("/".join(k) for block, _ in how for k, _ in block) + ")") if how else
               "diagonal (exact GGN)" for p, how in own.items()}
    if not own:
        return "no parameters"
    texts = sorted(set(own.values()))
    return texts[0] if len(texts) == 1 else "; ".join(f"{p.split('/', 1)[-1] or p}: {h}" for p, h in own.items())


def row(model: Layer, shape: tuple, ctx: dict) -> dict[str, str]:
    """``{extension: route}`` for one case (``cases()``), traced in float32 (nothing runs).

    Args:
        model: the case's model.
        shape: its input shape.
        ctx: its context.

    Returns:
        The route of every extension (module docstring).
    """
    params, state, x, y, key = inputs(model, shape, ctx, jnp.float32)
    traced: dict = {}
    return {e: _route(e, model, params, state, x, y, key, traced) for e in EXTENSIONS}


def table() -> list[tuple[str, dict[str, str]]]:
    """``[(case name, {extension: route})]`` for every catalogue case (module docstring)."""
    return [(name, row(model, shape, ctx)) for name, model, shape, ctx in cases()]


def markdown(rows=None) -> str:
    """The table as Markdown: one row per case, one column per extension.

    Args:
        rows: ``table()``'s rows (default: computed).

    Returns:
        The Markdown text.
    """
    rows = table() if rows is None else rows
    head = "| family | " + " | ".join(f"`{e}`" for e in EXTENSIONS) + " |"
    lines = [head, "|" + "---|" * (len(EXTENSIONS) + 1)]
    for name, cells in rows:
        lines.append(f"| `{name.replace('|', '/')}` | " + " | ".join(cells[e] for e in EXTENSIONS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m fbp.capabilities > docs/guides/capabilities-table.md
    print(markdown(), end="")
