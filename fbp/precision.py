"""Mixed precision: float32 master weights, layers computing in bfloat16 or float16, and
dynamic loss scaling for float16.

A ``Policy`` has jmp's shape, ``Policy.parse("params=float32,compute=bfloat16,output=float32")``:

* **params** — the dtype of the master weights the optimizer updates, and of its state;
* **compute** — the dtype the layers run in: each step casts params, model state and the
  input to it (integer inputs such as token ids stay as they are);
* **output** — the dtype the model's prediction is cast to before the loss, so losses (and
  their softmax) run in float32.

Inside the layers, what must not lose precision does not: normalisation statistics
(BatchNorm, LayerNorm, GroupNorm) and softmax are computed in float32 and cast back; the
weight-gradient matmuls of Dense and the convolutions accumulate in float32
(``preferred_element_type``) and round once. The parameter gradients are cast to the params
dtype before the optimizer sees them.

**Loss scaling** (float16's 5-bit exponent underflows small gradients). ``loss_scaled``
wraps an optimizer; its state holds the scale ``S``. The step seeds the backward pass with
``S`` instead of 1, the wrapper divides the gradients by ``S``, and on a non-finite gradient it
skips the step (params and inner optimizer state unchanged) and halves ``S``; after
``period`` finite steps in a row it doubles ``S``. bfloat16 has float32's exponent and needs
no scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import Layer, Loss, require_number, run_forward
from fbp.optim.base import GradientTransformation
from fbp.validation import typed_arguments

PyTree = Any
_NAMES = ("params", "compute", "output")
_F32_MAX = float(jnp.finfo(jnp.float32).max)


def _dtype_named(value: str, name: str, text: str):
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ValueError(f"Policy.parse: {name}={value!r} in {text!r} is not a dtype; use float32, bfloat16 or "
                         f"float16") from None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes for master params, layer computation and the prediction (module docstring).

    Args:
        params: the dtype params, gradients, optimizer state and model state are kept in.
        compute: the dtype the layers run in.
        output: the dtype of the prediction the loss sees.
    """

    params: Any = jnp.float32
    compute: Any = jnp.float32
    output: Any = jnp.float32

    def __post_init__(self):
        for name in _NAMES:
            try:
                dtype = jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"Policy: {name} must be a floating dtype (float32, bfloat16, float16, ...), got "
                                 f"{getattr(self, name)!r}") from None
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"Policy: {name} must be a floating dtype, got {dtype}")
            object.__setattr__(self, name, dtype)

    @classmethod
    def parse(cls, text: str) -> Policy:
        """``"params=float32,compute=bfloat16,output=float32"`` (unnamed parts keep float32), or a
        single dtype name for ``compute``: ``"bfloat16"``.

        Args:
            text: the policy's text.

        Returns:
            The ``Policy``.

        Raises:
            TypeError: ``text`` is not a string.
            ValueError: an unknown part, a part given twice, or a name that is not a floating dtype.
        """
        if not isinstance(text, str):
            raise TypeError(f"Policy.parse: expected text such as 'bfloat16' or 'params=float32,compute=bfloat16', "
                            f"got {type(text).__name__} {text!r}")
        if "=" not in text:
            return cls(compute=_dtype_named(text.strip(), "compute", text))
        fields = {}
        for part in text.split(","):
            name, equals, value = (s.strip() for s in part.partition("="))
            if name not in _NAMES or not equals:
                what = f"unknown part {name!r}" if name not in _NAMES else f"cannot read {part.strip()!r}"
                raise ValueError(f"Policy.parse: {what} in {text!r}; write name=dtype with names from "
                                 f"{', '.join(_NAMES)}, e.g. 'params=float32,compute=bfloat16'")
            if name in fields:
                raise ValueError(f"Policy.parse: {name!r} is given twice in {text!r}")
            fields[name] = _dtype_named(value, name, text)
        return cls(**fields)

    def __str__(self) -> str:
        return ",".join(f"{n}={jnp.dtype(getattr(self, n)).name}" for n in _NAMES)

    def cast(self, tree: PyTree, dtype) -> PyTree:
        """Floating leaves of ``tree`` cast to ``dtype`` (others, such as ids, kept)."""
        return jax.tree_util.tree_map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
                                      else a, tree)


@typed_arguments
def value_grad_and_output(model: Layer, loss: Loss, policy: Policy, params, x, y, *, state=None, key=None,
                          train: bool = True, scale=1.0):
    """``fbp.core.value_grad_and_output`` under a mixed-precision policy, with a loss scale.

    The layers run in ``policy.compute``, the loss in ``policy.output``, and the backward is
    seeded with ``scale`` (the gradients come back multiplied by it).

    Args:
        model: the model.
        loss: the loss.
        policy: the precision policy.
        params: the params (kept in ``policy.params``).
        x: the inputs.
        y: the targets.
        state: the model state, or ``None``.
        key: a random key for layers that need one.
        train: training mode.
        scale: the loss scale seeding the backward.

    Returns:
        ``(value, grads, pred, new_state)``; grads and state in ``policy.params``, ``pred`` in
        ``policy.output``.
    """
    compute = policy.cast(params, policy.compute)
    inner_state = None if state is None else policy.cast(state, policy.compute)
    pred, res = run_forward(model, compute, policy.cast(x, policy.compute), state=inner_state, key=key, train=train)
    out = pred.astype(policy.output)
    value, loss_res = loss.forward(out, y)
    d_out = loss.backward(loss_res, jnp.asarray(scale, value.dtype))
    d_params, _ = model.backward(res, d_out.astype(pred.dtype))
    new_state = None if state is None else policy.cast(model.next_state(inner_state, res), policy.params)
    return value, policy.cast(d_params, policy.params), out, new_state


# --------------------------------------------------------------------------- dynamic loss scaling
class LossScaleState(NamedTuple):
    scale: jax.Array
    finite_steps: jax.Array
    inner: PyTree


def current_scale(opt_state) -> jax.Array | float:
    """The loss scale held in a ``loss_scaled`` optimizer's state.

    Args:
        opt_state: an optimizer state.

    Returns:
        The scale of a ``LossScaleState``, else ``1.0``.
    """
    return opt_state.scale if isinstance(opt_state, LossScaleState) else 1.0


@typed_arguments
def loss_scaled(optimizer: GradientTransformation, init_scale: float = 2.0**15, period: int = 2000) -> \
        GradientTransformation:
    """``optimizer`` behind dynamic loss scaling (module docstring).

    ``update`` receives the gradients of the *scaled* loss (``make_step``/``fit`` seed the backward
    with the scale), divides them by it, skips the step and halves the scale on a non-finite
    gradient, and doubles the scale after ``period`` finite steps.

    Args:
        optimizer: the transformation to wrap.
        init_scale: the first scale (> 0).
        period: finite steps between doublings (a positive int).

    Returns:
        A ``GradientTransformation`` whose state is a ``LossScaleState``.

    Raises:
        TypeError: ``init_scale`` is not a number.
        ValueError: ``init_scale`` not in ``(0, float32 max]`` (a scale of inf turns every gradient
            into NaN and skips every step), or ``period`` not a positive int.
    """
    require_number("loss_scaled", "init_scale", init_scale, low=0, low_open=True, high=_F32_MAX)
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"loss_scaled: period must be a positive int (finite steps between doublings), got "
                         f"{period!r}")

    def init(params):
        return LossScaleState(jnp.asarray(init_scale, jnp.float32), jnp.zeros((), jnp.int32), optimizer.init(params))

    def update(grads, state, params=None):
        grads = jax.tree_util.tree_map(lambda g: g / state.scale.astype(g.dtype), grads)
        finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)] or [True]))
        safe = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, inner = optimizer.update(safe, state.inner, params)
        updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), inner, state.inner)
        count = jnp.where(finite, state.finite_steps + 1, 0)
        grow = count >= period
        scale = jnp.where(finite, jnp.where(grow, state.scale * 2, state.scale), state.scale / 2)
        return updates, LossScaleState(scale, jnp.where(grow, 0, count), inner)

    return GradientTransformation(init, update)
