"""The extension protocol: a quantity computed in the same backward pass as the gradient.

An extension is a small frozen value with a ``name`` (its key in the result), the per-example
quantity it ``needs`` from each leaf layer's rule (one of the probe's modes: ``"grads"``,
``"norms"``, ``"sgs"``, ``"clip"`` or ``"project"`` — what ``fbp.probes.project`` needs to
project every example's gradient onto any direction afterwards, ``fbp.probes``; or ``"columns"``: the squares of each
layer's gradients for the cotangent columns its ``columns(loss, y, key)`` gives, summed — a
second, column-vmapped backward on the same forward's residuals, as the GGN diagonal needs;
or ``"layer"``: what its own ``from_output(y)`` and ``from_backward(part, d_y, d_x, d_params,
params)`` compute at every leaf, parameter-free ones included, as telemetry's statistics; or
``"exact"``: every leaf's exact gradient from the exact twin's backward on the same residuals,
beside the rule's in ``Context.leaf_grads``, as the alignment angles; or ``"backward"``: what
its own ``from_pass(back, pred, loss, y, params)`` computes with the pass's linear backward
``back: u ↦ Jᵀu`` on the same residuals, as GGN-vector products), and ``finalize``, which
turns what every leaf produced into its result, keyed by leaf path. An extension that reads
several kinds names them all, ``needs = ("norms", "backward")``; its ``finalize`` then gets
``{kind: what that kind found}`` (``fbp.diagnostics``' tests combine norms, projections and
curvature this way). A whole-model quantity (a noise scale, a trace) may return an array
instead of a dict by leaf path::

    value, grads, q = fbp.value_and_grad(model, loss, extensions=[
        fbp.per_example.GradNorms(), fbp.per_example.Variance()])(params, x, y)
    q["grad_norms"]["2"]        # (B,): example b's gradient norm at the leaf "2"

Several extensions that need the same quantity share it; every quantity comes from the one
forward and one backward pass (``fbp.engine``). How each layer family computes a quantity
(positions and ghost norms, its own per-example rule, or its rules on each example alone) is
the probe's business (``fbp.probes``), declared beside the family's forward — an extension
never inspects layer types.

A user's extension is a subclass with those three members; ``docs/guides/per-example-and-privacy.md``
shows one in a few lines (per-example gradient cosine to the batch mean).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

NEEDS = ("grads", "norms", "sgs", "clip", "columns", "layer", "exact", "backward", "project")


class Context(NamedTuple):
    """What ``finalize`` may read besides the per-layer quantities.

    Attributes:
        model: the model.
        params: its params.
        values: the per-example losses (``reduction="none"``), batch first.
        grads: the gradient of the reduced loss, shaped like ``params``.
        summed: ``Σ_b ∇ℓ_b``, the sum of the per-example gradients, shaped like ``params``.
        leaf_grads: ``{path: Σ_b ∇ℓ_b at that leaf}`` for every leaf with parameters.
        batch: the number of examples ``B``.
        scale: the reduced loss over ``Σ_b ℓ_b`` (``1/N`` for a mean over ``N`` values, 1 for a
            sum): the cotangents of the pass are those of ``Σ_b ℓ_b``; times ``scale`` they are
            the reduced loss's.
        pred: the model's output.
        loss: the loss.
        y: the targets.
        back: the pass's linear backward ``u ↦ Jᵀu`` on the same residuals (``u`` shaped like
            ``pred``, the result like ``params``), a ``fbp.linear_pass.LinearPass``: its
            ``back.tangent(v)`` is ``J v``, the model's Jacobian-vector product, forward on the
            layers' tangent rules where every layer has one and by transposing ``back``
            otherwise. An extension reads projections onto any direction from it
            (``fbp.diagnostics``); unused, it costs nothing.
        shared: a dict, fresh for each pass, where extensions keep what several of them derive
            from the same quantities (``fbp.diagnostics``' tests share the examples' projections
            onto the mean gradient), under a key they agree on.
    """

    model: Any
    params: Any
    values: Any
    grads: Any
    summed: Any
    leaf_grads: dict
    batch: int
    scale: float = 1.0
    pred: Any = None
    loss: Any = None
    y: Any = None
    back: Any = None
    shared: Any = None


@dataclasses.dataclass(frozen=True)
class Extension:
    """The base of every extension (module docstring): set ``name`` and ``needs``, write ``finalize``."""

    name: ClassVar[str] = ""
    needs: ClassVar[str | tuple] = "grads"
    samples: ClassVar[bool] = False  # its columns are drawn at random (then the call needs a key)
    requires_independence: ClassVar[bool] = True  # per-example quantities need examples kept apart
    column_mode: ClassVar[str] = "sgs"  # needs "columns": the probes' mode on each column ("sgs": summed squares)
    column_key: ClassVar[str | None] = None  # needs "columns": extensions with one key share one column pass

    def from_output(self, y):
        """For ``needs = "layer"``: what to keep from a leaf's output ``y`` in the forward pass.

        Args:
            y: the leaf's output.

        Returns:
            A pytree, handed to ``from_backward``.
        """
        raise NotImplementedError

    def from_backward(self, part, d_y, d_x, d_params, params):
        """For ``needs = "layer"``: the leaf's result in the backward pass.

        Args:
            part: what ``from_output`` kept.
            d_y: the cotangent at the leaf's output.
            d_x: the cotangent its rule sends to its input.
            d_params: its parameter gradient (summed over the batch).
            params: its params.

        Returns:
            The leaf's result (a pytree of arrays).
        """
        raise NotImplementedError

    def columns(self, loss, y, key):
        """For ``needs = "columns"``: ``pred -> (*pred.shape, M)``, the cotangents to backpropagate.

        Args:
            loss: the loss.
            y: the targets.
            key: a random key (for sampled columns).

        Returns:
            The function, or ``None`` for other extensions.
        """
        return None

    def finalize(self, found: dict[str, Any], context: Context) -> dict[str, Any]:
        """This extension's result from what each leaf produced (by default, those quantities as they are).

        Args:
            found: ``{leaf path: the quantity named by needs}`` for every leaf with parameters
                (every leaf for ``needs = "layer"``); with several kinds, ``{kind: that dict}``.
            context: the rest of the pass (``Context``).

        Returns:
            ``{leaf path: result}``, or an array for a whole-model quantity.
        """
        return dict(found)


def check_extensions(extensions) -> tuple[Extension, ...]:
    """The extensions as a tuple, checked: instances of ``Extension`` with a known ``needs`` and
    distinct names.

    Args:
        extensions: a sequence of extensions.

    Returns:
        The tuple.

    Raises:
        TypeError: something that is not an ``Extension`` (a class instead of an instance, too).
        ValueError: an unknown ``needs``, or two extensions with one name.
    """
    if isinstance(extensions, Extension) or not isinstance(extensions, (list, tuple)):
        raise TypeError(f"extensions must be a list of extensions, e.g. [fbp.per_example.GradNorms()], got "
                        f"{extensions!r}")
    for e in extensions:
        if not isinstance(e, Extension):
            hint = " (an instance is needed: add ())" if isinstance(e, type) and issubclass(e, Extension) else ""
            raise TypeError(f"extensions: {e!r} is not an fbp extension{hint}")
        kinds = (e.needs,) if isinstance(e.needs, str) else tuple(e.needs)
        if not kinds or any(k not in NEEDS for k in kinds) or not e.name:
            raise ValueError(f"extensions: {type(e).__name__} needs {e.needs!r} (one of {NEEDS}, or a tuple of "
                             f"them) and a name, got "
                             f"name {e.name!r}")
    names = [e.name for e in extensions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"extensions: the name(s) {twice} are used twice; each result is keyed by its name")
    return tuple(extensions)
