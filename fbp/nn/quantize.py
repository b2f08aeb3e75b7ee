"""Quantisers with straight-through estimators (Bengio, Léonard & Courville, 2013).

A quantiser's true derivative is zero almost everywhere, so backpropagation through it would
stop learning. A straight-through estimator (STE) uses a surrogate derivative instead — it
deviates from JAX's gradient **by design**::

    Sign:   y = +1 if x >= 0 else -1        (0 maps to +1: outputs are exactly binary)
    Round:  y = round(x)                    (halves to even, as jnp.round)

    ste="identity":  d_x = d_y
    ste="hardtanh":  d_x = d_y · 1{|x| <= 1}    (the derivative of clip(x, -1, 1);
                                                     BinaryNet, Hubara et al. 2016)

On activations use them as layers (``Serial(Dense(256), Sign(), ...)``). On weights wrap a
layer: ``QuantizeWeights(Dense(256), Sign())`` runs the Dense with ``sign(w)`` and passes the
kernel's gradient straight through to the real-valued ``w`` the optimizer updates
(BinaryConnect, Courbariaux et al. 2015).

Each has a ``reference_apply`` for ``fbp.check``: ``s(x) + stop_gradient(q(x) - s(x))`` with
``s`` the identity or ``clip(x, -1, 1)`` — value ``q(x)``, JAX derivative the estimator's.

References:
    Bengio, Léonard & Courville, "Estimating or Propagating Gradients Through Stochastic
    Neurons for Conditional Computation", 2013. Courbariaux, Bengio & David, "BinaryConnect",
    NeurIPS 2015. Hubara et al., "Binarized Neural Networks", NeurIPS 2016.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, ParameterFree, Wrapper, require_floating, run_forward
from fbp.independence import declared
from fbp.validation import check_fields

ESTIMATORS = ("identity", "hardtanh")


class _Quantizer(ParameterFree):
    """``y = q(x)`` with a straight-through backward chosen by ``self.ste``."""

    ste: str = "identity"
    deviation: ClassVar[str] = ""

    def __post_init__(self):
        check_fields(self)
        if self.ste not in ESTIMATORS:
            raise ValueError(f"{type(self).__name__}: ste must be one of {ESTIMATORS}, "
                             f"got {self.ste!r}")

    def _q(self, x):
        raise NotImplementedError

    def _forward(self, x):
        return self._q(x), x

    def _backward(self, x, d_y):
        if self.ste == "identity":
            return d_y
        return jnp.where(jnp.abs(x) <= 1, d_y, jnp.zeros_like(d_y))

    self_adjoint = True  # the straight-through rule is diagonal: its transpose is itself (fbp.linear_pass)

    def _surrogate(self, x):
        return x if self.ste == "identity" else jnp.clip(x, -1, 1)

    def reference_apply(self, params, x, **context):
        s = self._surrogate(x)
        return s + jax.lax.stop_gradient(self._q(x) - s)


@dataclasses.dataclass(frozen=True)
class Sign(_Quantizer):
    """``y = sign(x)`` with ``sign(0) = +1``; straight-through backward (default ``"hardtanh"``).

    Args:
        ste: the straight-through estimator of the backward: ``"hardtanh"`` (default: ``d_y`` where ``|x| ≤ 1``)
            or ``"identity"``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    ste: str = "hardtanh"
    deviation: ClassVar[str] = "straight-through estimator in place of sign's zero derivative"

    def _q(self, x):
        return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


@dataclasses.dataclass(frozen=True)
class Round(_Quantizer):
    """``y = round(x)`` (halves to even); straight-through backward (default ``"identity"``).

    Args:
        ste: the straight-through estimator of the backward: ``"identity"`` (default) or ``"hardtanh"``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    ste: str = "identity"
    deviation: ClassVar[str] = "straight-through estimator in place of round's zero derivative"

    def _q(self, x):
        return jnp.round(x)


@dataclasses.dataclass(frozen=True)
class QuantizeWeights(Wrapper):
    """``layer`` run with its parameters ``keys`` quantised by ``quantizer`` in the forward pass.

    Params are ``layer``'s own (the real-valued weights the optimizer updates; the same paths).
    Backward: ``layer``'s rule gives the gradient with respect to the quantised weights, and the
    quantiser's straight-through rule carries it to the real ones::

        y = layer({..., w: q(w)}, x);   d_w = STE(d_{q(w)})

    ``QuantizeWeights(Dense(256), Sign())`` is BinaryConnect's binary-weight Dense.

    Args:
        layer: the wrapped layer; its params stay real-valued.
        quantizer: applied to the weights at ``keys`` in the forward (default ``Sign()``).
        keys: which entries of the layer's params are quantised (default ``("w",)``).
    """

    layer: Layer
    quantizer: _Quantizer = dataclasses.field(default_factory=Sign)
    keys: tuple[str, ...] = ("w",)
    deviation: ClassVar[str] = "weights quantised in the forward, their gradient passed straight through"

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.layer, Layer):
            raise TypeError(f"QuantizeWeights: layer must be an fbp Layer, got {type(self.layer).__name__}")
        if not isinstance(self.quantizer, _Quantizer):
            raise TypeError(f"QuantizeWeights: quantizer must be nn.Sign() or nn.Round(), got {self.quantizer!r}")
        if isinstance(self.keys, str) or not all(isinstance(k, str) for k in self.keys) or not self.keys:
            raise TypeError(f"QuantizeWeights: keys must be a non-empty tuple of parameter names such as ('w',), got "
                            f"{self.keys!r}" + (f" (a string would be read letter by letter: {tuple(self.keys)})"
                                                if isinstance(self.keys, str) else ""))
        object.__setattr__(self, "keys", tuple(self.keys))

    @property
    def contextual(self):  # type: ignore[override]
        return self.layer.contextual

    def examples_independent(self, train: bool) -> bool | None:
        """The wrapped layer's declaration (quantising weights mixes nothing)."""
        return declared(self.layer, train)

    def _quantized(self, params, quantize):
        missing = [k for k in self.keys if not hasattr(params, "keys") or k not in params]
        if missing:
            got = sorted(params.keys()) if hasattr(params, "keys") else type(params).__name__
            raise InputError(repr(self), f"has no parameter {missing} to quantise; its params are {got}")
        out, saved = dict(params), {}
        for k in self.keys:
            require_floating(repr(self), params[k], what=f"parameter {k!r}")
            out[k], saved[k] = quantize(params[k])
        return out, saved

    def forward(self, params, x, **context):
        q_params, saved = self._quantized(params, lambda w: self.quantizer.forward({}, w))
        y, res = run_forward(self.layer, q_params, x, **context)
        return y, (res, saved)

    def backward(self, res, d_y):
        inner, saved = res
        d_params, d_x = self.layer.backward(inner, d_y)
        d_params = dict(d_params)
        for k in self.keys:
            d_params[k] = self.quantizer.backward(saved[k], d_params[k])[1]
        return d_params, d_x

    def reference_apply(self, params, x, **context):
        q_params, _ = self._quantized(params, lambda w: (self.quantizer.reference_apply({}, w), None))
        return self.layer.apply(q_params, x, **context) if self.layer.contextual else \
            run_forward(self.layer, q_params, x)[0]
