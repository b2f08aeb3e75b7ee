"""One backward pass, several quantities: ``fbp.value_and_grad(model, loss, extensions=[...])``.

The engine runs the model's forward once with every leaf probed (``fbp.probes``), the loss's
per-example values and their backward, and the one probed backward pass; each leaf's rule
hands its probe its input and output cotangent, and the probe computes every quantity the
requested extensions need (``fbp.extensions``) — shared when two extensions need the same one.
Extensions that need cotangent columns (the GGN diagonal: the loss's Hessian-factor columns)
get a column-vmapped backward on the same forward's residuals; extensions that read every
leaf's output and cotangents (telemetry's statistics) hook into the probes. The probes refuse
a layer that mixes the batch unless no requested extension needs examples kept apart. Then
each extension's ``finalize`` turns the per-leaf quantities into its result.

Conventions: ``value`` and ``grads`` are those of the reduced loss (as ``fbp.core.value_and_grad``);
per-example quantities are those of each example's own loss ``ℓ_b`` (as ``fbp.per_example``),
whatever the reduction. Unless every requested extension reads batch statistics only
(``requires_independence = False``, telemetry's ``Stats``), every layer must keep the examples
of a batch apart (``fbp.independence``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from fbp import core, per_example
from fbp.core import InputError, Layer, Loss, map_leaf_params
from fbp.deviation import exact_model
from fbp.extensions import Context, Extension, check_extensions


def value_and_grad(model: Layer, loss: Loss, *, has_state: bool = False,
                   extensions: Sequence[Extension] | None = None, train: bool = True) -> Callable:
    """The backward transform, with any set of extensions computed in the same pass.

    Args:
        model: the network.
        loss: a loss with ``reduction="mean"`` or ``"sum"``.
        has_state: for models that keep state: ``f`` then takes the state and returns the new one.
        extensions: quantities to compute in the same pass (``fbp.extensions``); ``None`` or
            empty: the plain backward transform, ``fbp.core.value_and_grad``.
        train: run the model in training mode (default); ``False`` for evaluation mode (BatchNorm
            with its running statistics keeps the examples of a batch apart there). Only with
            extensions.

    Returns:
        Without extensions, ``fbp.core.value_and_grad(model, loss, has_state=has_state)``. With
        them, ``f(params, x, y, *, key=None) -> (value, grads, q)`` and, with ``has_state=True``,
        ``f(params, state, x, y, *, key=None) -> (value, grads, new_state, q)``: the same arity
        whatever the extensions; ``q[extension.name][leaf path]``.

    Raises:
        TypeError: an entry that is not an extension.
        ValueError: two extensions with one name, or a loss with ``reduction="none"``.
        InputError: a layer that mixes the examples of a batch (naming its path).
    """
    if not extensions:
        if not train:
            raise ValueError("fbp.value_and_grad: train=False is for the extensions' pass (evaluation-mode "
                             "curvature, per-example quantities); the plain transform trains")
        return core.value_and_grad(model, loss, has_state=has_state)
    extensions = check_extensions(extensions)
    if getattr(loss, "reduction", "mean") not in ("mean", "sum"):
        raise ValueError(f"fbp.value_and_grad: {loss!r} returns one value per example; the transform needs "
                         f"reduction='mean' or 'sum' (per-example values come from the extensions)")

    def body(params, x, y, *, state=None, key=None):
        value, grads, _, new_state, q = run(model, loss, extensions, params, x, y, state=state, key=key, train=train)
        return (value, grads, new_state, q) if has_state else (value, grads, q)

    return per_example.with_context(model, has_state, "fbp.value_and_grad", body)


def run(model: Layer, loss: Loss, extensions: Sequence[Extension], params, x, y, *, state=None, key=None,
        train: bool = True, with_context: bool = False):
    """The pass itself, for the training steps (``fbp.steps``): ``(value, grads, pred, new_state, q)``.

    Args:
        model: the model, in training mode.
        loss: a loss with ``reduction="mean"`` or ``"sum"``.
        extensions: checked extensions (``check_extensions``).
        params: the params.
        x: the inputs.
        y: the targets.
        state: the model state, or ``None``.
        key: a random key (required when the model or an extension samples).
        train: training mode.
        with_context: also return the ``fbp.extensions.Context`` the extensions read (its
            ``back`` gives Jacobian-vector products on the pass's residuals: ``fbp.diagnostics``
            projects the examples' gradients onto the update with it).

    Returns:
        ``(value, grads, pred, new_state, q)`` as ``value_and_grad``, with the model's output
        (and the context last, with ``with_context``).
    """
    modes = tuple(dict.fromkeys(n for e in extensions for n in needs_of(e) if n not in ("columns", "layer", "exact",
                                                                                          "backward")))
    by_columns = [e for e in extensions if "columns" in needs_of(e)]
    hooks = tuple(e for e in extensions if "layer" in needs_of(e))
    check = any(e.requires_independence for e in extensions)
    sampled = any(e.samples for e in by_columns)
    model_key, sample_key = key, key
    if sampled:
        if key is None:
            raise InputError("fbp.value_and_grad", f"{[e.name for e in by_columns if e.samples]} sample "
                                                   f"targets: pass key=jax.random.key(...)")
        if model.needs_key:  # as fbp.curvature: one key for the model, one for the samples
            model_key, sample_key = tuple(jax.random.split(key))
    shared = {}  # one column pass per column_key (the GGN diagonal's, shared by its readers)
    for e in by_columns:
        shared.setdefault(e.column_key or e.name, (e.column_mode, e.columns(loss, y, sample_key)))
    column_sets = tuple(shared.values())
    exact = None
    if any("exact" in needs_of(e) for e in extensions):
        exact = exact_model(model)
        if exact is None:
            raise InputError(repr(model), f"{[e.name for e in extensions if 'exact' in needs_of(e)]} compare each "
                                          f"layer's rule with its exact gradient: the model needs layers with "
                                          f"a rule and an exact VJP beside it (fbp.credit, fbp.nn.hooks)")
    values, summed, per, column_per, new_state, pred, exact_summed, back = per_example.one_pass(
        model, loss, params, x, y, modes=modes, column_sets=column_sets, hooks=hooks, check=check, state=state,
        key=model_key, train=train, exact=exact)
    by_key = dict(zip(shared, column_per, strict=True))
    found_columns = {e.name: by_key[e.column_key or e.name] for e in by_columns}
    scale = 1.0 / values.size if loss.reduction == "mean" else 1.0
    value = values.sum() * scale
    grads = summed if scale == 1.0 else _scaled(summed, scale)
    leaf_grads: dict = {}
    map_leaf_params(model, summed, lambda path, leaf, g: leaf_grads.setdefault(path, g))
    context = Context(model, params, values, grads, summed, leaf_grads, values.shape[0], scale, pred, loss, y, back,
                      {})

    def found(e, need):
        if need == "columns":
            quantity, layout = found_columns[e.name]
            return quantity if e.column_mode == "sgs" else \
                {path: {"out": out, "layout": layout[path]} for path, out in quantity.items()}
        if need == "layer":
            return {path: got["layer"][e.name] for path, got in per.items() if "layer" in got}
        if need in ("exact", "backward"):  # a params-shaped tree, split by leaf
            tree = exact_summed if need == "exact" else e.from_pass(back, pred, loss, y, params)
            found_tree: dict = {}
            map_leaf_params(model, tree, lambda path, leaf, g: found_tree.setdefault(path, g))
            return {path: g for path, g in found_tree.items() if path in leaf_grads}
        return {path: got[need] for path, got in per.items() if need in got}

    q = {e.name: e.finalize(found(e, e.needs) if isinstance(e.needs, str) else {n: found(e, n) for n in e.needs},
                            context) for e in extensions}
    return (value, grads, pred, new_state, q) + ((context,) if with_context else ())


def needs_of(e: Extension) -> tuple[str, ...]:
    """An extension's ``needs`` as a tuple (one kind, or several: then ``finalize`` gets ``{kind: found}``).

    Args:
        e: the extension.

    Returns:
        The kinds it reads.
    """
    return (e.needs,) if isinstance(e.needs, str) else tuple(e.needs)


def _scaled(tree, scale):
    return jax.tree_util.tree_map(lambda g: g * scale, tree)
