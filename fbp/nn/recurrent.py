"""Recurrent layers with hand-written backpropagation through time: SimpleRNN here, LSTM and GRU
in ``fbp.nn.gated`` (on the same ``_Recurrent`` base).

Inputs are ``(batch, time, features)``; the output is the whole hidden sequence
``(batch, time, hidden)``. An initial state may be passed with the input: ``(x, h0)`` for
SimpleRNN and GRU, ``(x, (h0, c0))`` for LSTM; then the input cotangent has the same shape,
``(d_x, d_h0)`` or ``(d_x, (d_h0, d_c0))``. Without it the state starts at zero.

How the backward is organised (the same for all three):

1. The forward scan computes ``A_t = x_t W_x + b`` inside each step (measured here: hoisting
   it out as one ``(T·B, F) × (F, G·H)`` matmul made the forward slower on CPU — the big
   time-major intermediate costs more than it saves).
2. The forward emits each gate as its own ``(T, B, H)`` array, and the reverse scan
   (``lax.scan(..., reverse=True)``) carries only the cotangents of the recurrent state and
   emits the pre-activation cotangents ``dA_t`` as separate per-gate arrays too (slicing gates
   out of one ``(T, B, G·H)`` array made the LSTM's reverse loop slower on CPU; the
   Performance page has the measurement).
   The LSTM loop emits only ``dc_t`` and ``dA_o``, the GRU loop only ``dh_t``; the other
   blocks are ``dc`` (``dh``) times gate derivatives and are recomputed after the loop over all
   steps at once — fewer sequence-sized arrays at the memory peak, fewer writes in the loop.
3. After the scan, every weight gradient is **one large matmul over all time steps** (one per
   gate block): ``d_W_x = Xᵀ dA``, ``d_W_h = H_prevᵀ dA``, ``d_b = Σ dA``, ``d_x = dA W_xᵀ`` —
   instead of accumulating ``T`` small outer products inside the loop.

Measured (``benchmarks/bench_sequence.py``, LSTM T=64, B=64, in 32, hidden 256, 2-core CPU): the
separate gate arrays took the step from 0.99 to 0.84 of the fastest form under JAX's ``value_and_grad``,
emitting ``(dc, dA_o)`` took its XLA temp memory from 0.90 to 0.74.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import InputError, Layer, ParameterFree, check_params, describe, require_floating
from fbp.nn import init as initializers
from fbp.nn.dense import bias_grad
from fbp.nn.positions import Positions, batch_major
from fbp.validation import check_fields


def _sigmoid(z):
    return jax.nn.sigmoid(z)


def _flat(a):
    return a.reshape(-1, a.shape[-1])


def _at(d_y, t):
    """``d_y[:, t]`` read inside the reverse scan: the batch-major cotangent is never transposed
    to time-major (that copy cost 8% of the LSTM step's temporary memory)."""
    return lax.dynamic_index_in_dim(d_y, t, axis=1, keepdims=False)


@dataclasses.dataclass(frozen=True)
class _Recurrent(Layer):
    hidden: int
    kernel_init: Callable = initializers.glorot_uniform
    recurrent_init: Callable = initializers.orthogonal()
    gates: int = dataclasses.field(default=1, init=False, repr=False)

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"{type(self).__name__}: hidden must be a positive int, got {self.hidden!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(hidden={self.hidden})"

    def _split(self, inputs):
        """``(x, carry or None)``, validated."""
        x, carry = inputs if isinstance(inputs, tuple) else (inputs, None)
        require_floating(repr(self), x)
        if x.ndim != 3:
            raise InputError(repr(self), f"input x must be (batch, time, features), received {describe(x)}")
        if x.shape[1] == 0:
            raise InputError(repr(self), f"received a sequence of length 0, {describe(x)}: there is no step to run "
                                         f"(and no last state); give every sequence at least one step")
        if carry is not None:
            for c in jax.tree_util.tree_leaves(carry):
                if tuple(c.shape) != (x.shape[0], self.hidden):
                    raise InputError(repr(self), f"initial state must be ({x.shape[0]}, {self.hidden}), "
                                                 f"received {describe(c)}")
        return x, carry

    def init(self, key, inputs):
        x, _ = self._split(inputs)
        k1, k2 = jax.random.split(key)
        g, h = self.gates, self.hidden
        return {"w_x": self.kernel_init(k1, (x.shape[-1], g * h), x.dtype),
                "w_h": jnp.concatenate([self.recurrent_init(k, (h, h), x.dtype)
                                        for k in jax.random.split(k2, g)], axis=1),
                "b": self._bias_init(x.dtype)}

    def _bias_init(self, dtype):
        return jnp.zeros((self.gates * self.hidden,), dtype)

    def _check_params(self, params, x):
        g, h = self.gates, self.hidden
        expected = {"w_x": (x.shape[-1], g * h), "w_h": (h, g * h), "b": (g * h,), **self._extra_params()}
        check_params(repr(self), params, expected, x)

    def _extra_params(self):
        return {}

    @staticmethod
    def _time_major(x):
        return x.swapaxes(0, 1)

    @staticmethod
    def _shifted(h0, hs):
        """``(h_0 … h_{T-1})``, the state entering each step (``H`` wide — the shifted copy is of
        the hidden sequence, never of the ``G·H``-wide cotangents)."""
        return jnp.concatenate([h0[None], hs[:-1]])

    @staticmethod
    def _recurrent_grad(h_prev, d_r):
        """``Σ_t h_{t-1}ᵀ dR_t`` as one matmul per gate block over all ``T·B`` rows."""
        h_prev = _flat(h_prev).T
        return jnp.concatenate([h_prev @ _flat(d) for d in d_r], axis=1)

    def _cotangents(self, res, d_y):
        """``(d_a, d_r, h_prev, d_carry0)``: the reverse scan's gate cotangents as time-major
        ``(T, B, H)`` blocks (``d_r`` the recurrent projection's where it differs, else ``None``),
        the states entering each step, and the initial state's cotangent."""
        raise NotImplementedError

    def backward(self, res, d_y):
        d_a, d_r, h_prev, d_carry = self._cotangents(res, d_y)
        d_params, d_x = self._weight_grads(res.x, res.w_x, d_a, h_prev, d_r)
        if d_r is not None:
            d_params["b_h"] = jnp.concatenate([bias_grad(d) for d in d_r])
        return d_params, ((d_x, d_carry) if res.has_carry else d_x)

    def per_example_positions(self, res, d_y):
        """Per-example rule (``fbp.nn.positions``): ``W_x`` and ``W_h`` are used at every time
        step, with inputs ``x_t`` and ``h_{t-1}`` and the gate cotangents ``dA_t`` as outputs'."""
        x = res.x
        d_a, d_r, h_prev, _ = self._cotangents(res, d_y)
        g, h_prev = batch_major(jnp.concatenate(d_a, axis=-1)), batch_major(h_prev)
        w_x = (("w_x",), [x], (x.shape[-1], g.shape[-1]))
        w_h = (("w_h",), [h_prev], (self.hidden, g.shape[-1]))
        if d_r is None:
            return [Positions((w_x, w_h), g, ("b",))], {}
        return [Positions((w_x,), g, ("b",)), Positions((w_h,), batch_major(jnp.concatenate(d_r, axis=-1)),
                                                         ("b_h",))], {}

    def _tangent_inputs(self, res, d_params, d_x):
        """``(Ȧ, h_prev, ṡ_0)`` for a tangent rule: the input projection's tangent over all steps,
        ``x_t ẇ_x + ḃ + ẋ_t W_x`` (time-major ``(T, B, G·H)``, one matmul each), the states
        entering each step, and the initial state's tangent (``None``: zero)."""
        t_x, t_carry = d_x if isinstance(d_x, tuple) else (d_x, None)
        a = self._time_major(res.x) @ d_params["w_x"] + d_params["b"]
        if t_x is not None:
            a = a + self._time_major(t_x) @ res.w_x
        return a, self._shifted(res.h0, res.hs), t_carry

    def _weight_grads(self, x, w_x, d_a, h_prev, d_r=None):
        """The post-scan matmuls: ``d_W_x``, ``d_b``, ``d_W_h`` and ``d_x`` from the time-major gate
        cotangents ``d_a`` — a tuple of ``(T, B, H)`` blocks, one per gate, never concatenated into
        one ``(T, B, G·H)`` array (that copy would be the largest temporary of the step). ``d_r``:
        the recurrent projection's cotangent where it differs from ``d_a`` (GRU)."""
        x_t = _flat(x.swapaxes(0, 1)).T  # time-major like d_a; x is the narrow one, so it is the one moved
        h = self.hidden
        d_x = sum(d @ w_x[:, k * h:(k + 1) * h].T for k, d in enumerate(d_a)).swapaxes(0, 1)
        return ({"w_x": jnp.concatenate([x_t @ _flat(d) for d in d_a], axis=1),
                 "b": jnp.concatenate([bias_grad(d) for d in d_a]),
                 "w_h": self._recurrent_grad(h_prev, d_a if d_r is None else d_r)}, d_x)


class SimpleRNNRes(NamedTuple):
    """What SimpleRNN's backward keeps: the input, the initial and every hidden state, the kernels."""

    x: jax.Array  # (B, T, F)
    h0: jax.Array  # (B, H)
    hs: jax.Array  # (T, B, H), time-major
    w_x: jax.Array
    w_h: jax.Array
    has_carry: bool  # whether the input was (x, h0): then the backward returns (d_x, d_h0)


@dataclasses.dataclass(frozen=True, repr=False)
class SimpleRNN(_Recurrent):
    """Elman RNN: ``h_t = tanh(x_t W_x + h_{t-1} W_h + b)``.

    Backward, with ``dh_t = d_y_t + dh_{t+1} W_hᵀ``-style carry: ``dA_t = dh_t ⊙ (1 - h_t²)``,
    carry ``dA_t W_hᵀ`` to step ``t - 1``. Params ``w_x (F, H)``, ``w_h (H, H)``, ``b (H,)``.

    Args:
        hidden: the width ``H`` of the hidden state.
        kernel_init: initializer of ``w_x`` (default Glorot uniform).
        recurrent_init: initializer of ``w_h`` (default orthogonal).

    Shapes:
        ``x (B, T, F) -> y (B, T, H)``, every step's hidden state; pass ``(x, h0)`` to
        start from a given state, then the backward returns ``(d_x, d_h0)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    def forward(self, params, inputs):
        x, h0 = self._split(inputs)
        self._check_params(params, x)
        h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype) if h0 is None else h0
        w_x, w_h, b = params["w_x"], params["w_h"], params["b"]

        def step(h, x_t):
            h = jnp.tanh(x_t @ w_x + b + h @ w_h)
            return h, h

        _, hs = lax.scan(step, h0, self._time_major(x))
        return hs.swapaxes(0, 1), SimpleRNNRes(x, h0, hs, params["w_x"], w_h, isinstance(inputs, tuple))

    def tangent(self, res: SimpleRNNRes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): ``ḣ_t = (1 − h_t²) ⊙ (Ȧ_t + h_{t-1} ẇ_h + ḣ_{t-1} W_h)``,
        a forward scan carrying ``ḣ`` (``Ȧ_t`` and ``h_{t-1} ẇ_h`` for all steps at once)."""
        a, h_prev, t_h0 = self._tangent_inputs(res, d_params, d_x)
        a = a + h_prev @ d_params["w_h"]

        def step(t_h, inp):
            a_t, h_t = inp
            t_h = (1 - h_t * h_t) * (a_t + t_h @ res.w_h)
            return t_h, t_h

        _, out = lax.scan(step, jnp.zeros_like(res.h0) if t_h0 is None else t_h0, (a, res.hs))
        return out.swapaxes(0, 1)

    def backward_tangent(self, res: SimpleRNNRes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): the reverse scan differentiated along the forward's
        tangent (``ḣ_t``, ``tangent``), ``d_y`` held. With ``dh_t = d_y_t + dA_{t+1} W_hᵀ`` and
        ``dA_t = dh_t ⊙ (1 − h_t²)`` (``_cotangents``), a reverse scan gives
        ``Ṙ_t = (Ṙ_{t+1} W_hᵀ + dA_{t+1} ẇ_hᵀ) ⊙ (1 − h_t²) − 2 dh_t ⊙ h_t ⊙ ḣ_t``; then
        ``w_x``'s term is ``Σ_t x_tᵀ Ṙ_t + ẋ_tᵀ dA_t``, ``w_h``'s ``Σ_t h_{t-1}ᵀ Ṙ_t + ḣ_{t-1}ᵀ dA_t``,
        ``b``'s ``Σ_t Ṙ_t``, the input's ``Ṙ_t W_xᵀ + dA_t ẇ_xᵀ`` and ``h_0``'s ``Ṙ_0 W_hᵀ + dA_0 ẇ_hᵀ``."""
        t_x, t_h0 = d_x if isinstance(d_x, tuple) else (d_x, None)
        t_h = self.tangent(res, d_params, d_x).swapaxes(0, 1)  # time-major ḣ_t
        (d_a,), _, h_prev, _ = self._cotangents(res, d_y)
        hs, w_h, v_h = res.hs, res.w_h, d_params["w_h"]
        later = jnp.concatenate([d_a[1:], jnp.zeros_like(d_a[:1])])  # dA_{t+1}, 0 after the last step
        dh = self._time_major(d_y) + later @ w_h.T
        u = (later @ v_h.T) * (1 - hs * hs) - 2 * dh * hs * t_h

        def step(carry, inp):
            u_t, h_t = inp
            r_a = carry * (1 - h_t * h_t) + u_t
            return r_a @ w_h.T, r_a

        r_h0, r_a = lax.scan(step, jnp.zeros_like(res.h0), (u, hs), reverse=True)
        grads, s_x = self._weight_grads(res.x, res.w_x, (r_a,), h_prev)
        t_prev = self._shifted(jnp.zeros_like(res.h0) if t_h0 is None else t_h0, t_h)
        moved, s_moved = self._weight_grads(jnp.zeros_like(res.x) if t_x is None else t_x, d_params["w_x"], (d_a,),
                                            t_prev)
        grads = {"w_x": grads["w_x"] + moved["w_x"], "w_h": grads["w_h"] + moved["w_h"], "b": grads["b"]}
        s_x = s_x + s_moved
        return grads, ((s_x, r_h0 + d_a[0] @ v_h.T) if res.has_carry else s_x)

    def _cotangents(self, res: SimpleRNNRes, d_y):
        h0, hs, w_h = res.h0, res.hs, res.w_h

        def step(dh_next, inp):
            t, h_t = inp
            d_a = (_at(d_y, t) + dh_next) * (1 - h_t * h_t)
            return d_a @ w_h.T, d_a

        d_h0, d_a = lax.scan(step, jnp.zeros_like(h0), (jnp.arange(d_y.shape[1]), hs), reverse=True)
        return (d_a,), None, self._shifted(h0, hs), d_h0


@dataclasses.dataclass(frozen=True)
class LastStep(ParameterFree):
    """``(batch, time, features) -> (batch, features)``: the final time step;
    ``d_x`` is zero except at ``t = T - 1``. The residual is the input's shape alone."""
    independent_examples = True  # each example's output and input cotangent are its own

    piecewise_linear = True

    def _forward(self, x):
        if x.ndim != 3:
            raise InputError(repr(self), f"input x must be (batch, time, features), received {describe(x)}")
        if x.shape[1] == 0:
            raise InputError(repr(self), f"received a sequence of length 0, {describe(x)}: it has no last step")
        return x[:, -1], x.shape

    def _backward(self, shape, d_y):
        return jnp.zeros(shape, d_y.dtype).at[:, -1].set(d_y)

    def _tangent(self, shape, d_x):
        """Forward mode (``fbp.linear_pass``): the last step's tangent."""
        return d_x[:, -1]
