"""The gated recurrent cells, LSTM and GRU, on ``fbp.nn.recurrent``'s scaffolding (its module
docstring says how the backward through time is organised and measured)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fbp.core import InputError
from fbp.nn.dense import bias_grad
from fbp.nn.recurrent import _at, _Recurrent, _sigmoid


class LSTMRes(NamedTuple):
    """What the LSTM's backward keeps: as SimpleRNN's, plus the cell state entering each step and
    the four gates as separate ``(T, B, H)`` arrays ``(i, f, g, o)``."""

    x: jax.Array
    h0: jax.Array
    hs: jax.Array
    c_prev: jax.Array
    gates: tuple
    w_x: jax.Array
    w_h: jax.Array
    has_carry: bool


class GRURes(NamedTuple):
    """What the GRU's backward keeps: as SimpleRNN's, plus per step ``(z, r, n, R_n)``."""

    x: jax.Array
    h0: jax.Array
    hs: jax.Array
    parts: tuple
    w_x: jax.Array
    w_h: jax.Array
    has_carry: bool


@dataclasses.dataclass(frozen=True, repr=False)
class LSTM(_Recurrent):
    """Long short-term memory (Hochreiter & Schmidhuber, 1997; forget gate: Gers et al., 2000).

    Gates in the order ``i, f, g, o`` (as PyTorch): ``[a_i, a_f, a_g, a_o] = x_t W_x + h_{t-1} W_h + b``,
    ``i = σ(a_i)``, ``f = σ(a_f)``, ``g = tanh(a_g)``, ``o = σ(a_o)``, ``c_t = f c_{t-1} + i g``,
    ``h_t = o tanh(c_t)``. The forget-gate bias starts at 1 (Jozefowicz et al., 2015).

    Backward step (``dh = d_y_t + carry_h``): ``do = dh tanh(c_t)``,
    ``dc = dh o (1 - tanh²c_t) + carry_c``, ``di = dc g``, ``dg = dc i``, ``df = dc c_{t-1}``;
    ``dA = [di i(1-i), df f(1-f), dg (1-g²), do o(1-o)]``; carries ``dA W_hᵀ`` and ``dc f``.
    Params ``w_x (F, 4H)``, ``w_h (H, 4H)``, ``b (4H,)``.

    Args:
        hidden: the width ``H`` of the hidden state.
        kernel_init: initializer of ``w_x`` (default Glorot uniform).
        recurrent_init: initializer of ``w_h`` (default orthogonal).

    Shapes:
        ``x (B, T, F) -> y (B, T, H)``, every step's hidden state; pass ``(x, (h0, c0))`` to start
        from a given state, then the backward returns ``(d_x, (d_h0, d_c0))``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    gates: int = dataclasses.field(default=4, init=False, repr=False)

    def _bias_init(self, dtype):
        h = self.hidden
        return jnp.zeros((4 * h,), dtype).at[h:2 * h].set(1.0)

    def _split(self, inputs):
        x, carry = super()._split(inputs)
        if carry is not None and (not isinstance(carry, tuple) or len(carry) != 2):
            raise InputError(repr(self), "the initial state of an LSTM is a pair (h0, c0)")
        return x, carry

    def forward(self, params, inputs):
        x, carry = self._split(inputs)
        self._check_params(params, x)
        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        h0, c0 = (zeros, zeros) if carry is None else carry
        w_x, w_h, b, hd = params["w_x"], params["w_h"], params["b"], self.hidden

        def step(hc, x_t):
            h, c = hc
            a = x_t @ w_x + b + h @ w_h
            i, f, o = _sigmoid(a[:, :hd]), _sigmoid(a[:, hd:2 * hd]), _sigmoid(a[:, 3 * hd:])
            g = jnp.tanh(a[:, 2 * hd:3 * hd])
            c_prev = c
            c = f * c + i * g
            h = o * jnp.tanh(c)
            return (h, c), (h, c_prev, (i, f, g, o))

        # residuals: the cell state *before* each step (c_t is recomputed exactly as f c_{t-1} + i g)
        # and the four gates as separate (T, B, H) arrays (module docstring, point 2).
        _, (hs, c_prev, gates) = lax.scan(step, (h0, c0), self._time_major(x))
        return hs.swapaxes(0, 1), LSTMRes(x, h0, hs, c_prev, gates, params["w_x"], w_h, carry is not None)

    def tangent(self, res: LSTMRes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): with ``ȧ_t = Ȧ_t + h_{t-1} ẇ_h + ḣ_{t-1} W_h``,
        ``i̇ = i(1−i) ȧ_i``, ``ḟ = f(1−f) ȧ_f``, ``ġ = (1−g²) ȧ_g``, ``ȯ = o(1−o) ȧ_o``,
        ``ċ_t = ḟ c_{t-1} + f ċ_{t-1} + i̇ g + i ġ`` and ``ḣ_t = ȯ tanh c_t + o (1 − tanh² c_t) ċ_t``:
        a forward scan carrying ``(ḣ, ċ)``."""
        return self._tangent_steps(res, d_params, d_x)[0].swapaxes(0, 1)

    def _tangent_steps(self, res: LSTMRes, d_params, d_x):
        """``(ḣ, ċ, (i̇, ḟ, ġ, ȯ))`` of every step, time-major (``tangent``)."""
        a, h_prev, t_carry = self._tangent_inputs(res, d_params, d_x)
        a, hd = a + h_prev @ d_params["w_h"], self.hidden
        zeros = jnp.zeros_like(res.h0)

        def step(carry, inp):
            t_h, t_c = carry
            a_t, cp, (i, f, g, o) = inp
            a_t = a_t + t_h @ res.w_h
            t_i, t_f = i * (1 - i) * a_t[:, :hd], f * (1 - f) * a_t[:, hd:2 * hd]
            t_g, t_o = (1 - g * g) * a_t[:, 2 * hd:3 * hd], o * (1 - o) * a_t[:, 3 * hd:]
            tc = jnp.tanh(f * cp + i * g)
            t_c = t_f * cp + f * t_c + t_i * g + i * t_g
            t_h = t_o * tc + o * (1 - tc * tc) * t_c
            return (t_h, t_c), (t_h, t_c, (t_i, t_f, t_g, t_o))

        return lax.scan(step, (zeros, zeros) if t_carry is None else t_carry, (a, res.c_prev, res.gates))[1]

    def backward_tangent(self, res: LSTMRes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): the reverse scan differentiated along the forward's
        tangents (``_tangent_steps``), ``d_y`` held. With the backward's ``dh_t``, ``dc_t`` and
        ``dA_t`` (``_cotangents``) and ``τ = tanh c_t``, a reverse scan carries
        ``(Ṙ_{t+1} W_hᵀ, Ṙc_{t+1} f_{t+1})`` and gives, per step,

        * ``Ṙh_t = Ṙ_{t+1} W_hᵀ + dA_{t+1} ẇ_hᵀ``;
        * ``Ṙc_t = Ṙh_t o(1−τ²) + dh_t ȯ (1−τ²) − 2 dh_t o τ τ̇ + Ṙc_{t+1} f_{t+1} + dc_{t+1} ḟ_{t+1}``
          (``τ̇ = (1−τ²) ċ_t``);
        * ``Ṙ_o = Ṙh τ o(1−o) + dh τ̇ o(1−o) + dh τ ȯ(1−2o)``,
          ``Ṙ_i = Ṙc g i(1−i) + dc ġ i(1−i) + dc g i̇(1−2i)``,
          ``Ṙ_f = Ṙc c_{t-1} f(1−f) + dc ċ_{t-1} f(1−f) + dc c_{t-1} ḟ(1−2f)``,
          ``Ṙ_g = Ṙc i(1−g²) + dc i̇(1−g²) − 2 dc i g ġ``;

        then, as for SimpleRNN, the weights' terms ``x_tᵀ Ṙ_t + ẋ_tᵀ dA_t`` and
        ``h_{t-1}ᵀ Ṙ_t + ḣ_{t-1}ᵀ dA_t``, the bias's ``Σ Ṙ_t``, the input's ``Ṙ_t W_xᵀ + dA_t ẇ_xᵀ``,
        and the initial state's ``(Ṙ_0 W_hᵀ + dA_0 ẇ_hᵀ, Ṙc_0 f_0 + dc_0 ḟ_0)``."""
        t_x, t_carry = d_x if isinstance(d_x, tuple) else (d_x, None)
        t_h, t_c, (t_i, t_f, t_g, t_o) = self._tangent_steps(res, d_params, d_x)
        (_, dc, da_o), h_prev = self._reverse_scan(res, d_y), self._shifted(res.h0, res.hs)
        i, f, g, o = res.gates
        cp, w_h, v_h, zeros = res.c_prev, res.w_h, d_params["w_h"], jnp.zeros_like(res.h0)
        d_a = (*self._cell_grads(dc, cp, i, f, g), da_o)
        later = lambda a: jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])  # noqa: E731  (step t+1's, 0 after the last)
        d_a_later = later(jnp.concatenate(d_a, axis=-1))
        dh = self._time_major(d_y) + d_a_later @ w_h.T
        tau = jnp.tanh(f * cp + i * g)
        t_tau = (1 - tau * tau) * t_c
        t_cp = self._shifted(zeros if t_carry is None else t_carry[1], t_c)

        def step(carry, inp):
            r_next, rc_next = carry
            e_h, e_c, dh, dc, cp, (i, f, g, o), (t_i, t_f, t_g, t_o), tau, t_tau, t_cp = inp
            r_h = r_next + e_h
            r_c = (r_h * o * (1 - tau * tau) + dh * t_o * (1 - tau * tau) - 2 * dh * o * tau * t_tau
                   + rc_next + e_c)
            r_o = r_h * tau * o * (1 - o) + dh * t_tau * o * (1 - o) + dh * tau * t_o * (1 - 2 * o)
            r_i = r_c * g * i * (1 - i) + dc * t_g * i * (1 - i) + dc * g * t_i * (1 - 2 * i)
            r_f = r_c * cp * f * (1 - f) + dc * t_cp * f * (1 - f) + dc * cp * t_f * (1 - 2 * f)
            r_g = r_c * i * (1 - g * g) + dc * t_i * (1 - g * g) - 2 * dc * i * g * t_g
            return (jnp.concatenate([r_i, r_f, r_g, r_o], axis=-1) @ w_h.T, r_c * f), (r_i, r_f, r_g, r_o)

        inputs = (d_a_later @ v_h.T, later(dc * t_f), dh, dc, cp, res.gates, (t_i, t_f, t_g, t_o), tau, t_tau, t_cp)
        (r_h0, r_c0), r_a = lax.scan(step, (zeros, zeros), inputs, reverse=True)
        grads, s_x = self._weight_grads(res.x, res.w_x, r_a, h_prev)
        t_prev = self._shifted(zeros if t_carry is None else t_carry[0], t_h)
        moved, s_moved = self._weight_grads(jnp.zeros_like(res.x) if t_x is None else t_x, d_params["w_x"], d_a,
                                            t_prev)
        grads = {"w_x": grads["w_x"] + moved["w_x"], "w_h": grads["w_h"] + moved["w_h"], "b": grads["b"]}
        s_carry = (r_h0 + jnp.concatenate(d_a, axis=-1)[0] @ v_h.T, r_c0 + dc[0] * t_f[0])
        return grads, ((s_x + s_moved, s_carry) if res.has_carry else s_x + s_moved)

    @staticmethod
    def _cell_grads(dc, c_prev, i, f, g):
        """``(dA_i, dA_f, dA_g)`` from the cell-state cotangent ``dc`` of a step."""
        return dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g)

    def _cotangents(self, res: LSTMRes, d_y):
        (d_h0, d_c0), dc, da_o = self._reverse_scan(res, d_y)
        # the loop emits two (T, B, H) arrays, not four: the i, f, g blocks are recomputed from dc
        # over all steps at once (cheap, vectorised) — the reverse loop's peak memory is two
        # sequence-sized arrays lower and it writes half as much
        i, f, g, _ = res.gates
        return (*self._cell_grads(dc, res.c_prev, i, f, g), da_o), None, self._shifted(res.h0, res.hs), (d_h0, d_c0)

    def _reverse_scan(self, res: LSTMRes, d_y):
        """``((d_h0, d_c0), dc, dA_o)``: the backward's loop, ``dc_t`` and ``dA_o`` time-major."""
        h0, c_prev, gates, w_h = res.h0, res.c_prev, res.gates, res.w_h

        def step(carry, inp):
            dh_next, dc_next = carry
            t, cp_t, (i, f, g, o) = inp
            tc = jnp.tanh(f * cp_t + i * g)
            dh = _at(d_y, t) + dh_next
            dc = dh * o * (1 - tc * tc) + dc_next
            da_o = dh * tc * o * (1 - o)
            d_a = jnp.concatenate([*self._cell_grads(dc, cp_t, i, f, g), da_o], axis=-1)
            return (d_a @ w_h.T, dc * f), (dc, da_o)

        init = (jnp.zeros_like(h0), jnp.zeros_like(h0))
        steps = jnp.arange(d_y.shape[1])
        (d_h0, d_c0), (dc, da_o) = lax.scan(step, init, (steps, c_prev, gates), reverse=True)
        return (d_h0, d_c0), dc, da_o


@dataclasses.dataclass(frozen=True, repr=False)
class GRU(_Recurrent):
    """Gated recurrent unit (Cho et al., 2014), in the "reset after" form of PyTorch and cuDNN.

    With ``A = x_t W_x + b`` and ``R = h_{t-1} W_h + b_h`` split into ``z, r, n`` parts:
    ``z = σ(A_z + R_z)``, ``r = σ(A_r + R_r)``, ``n = tanh(A_n + r R_n)``,
    ``h_t = (1 - z) n + z h_{t-1}``.

    Backward step (``dh = d_y_t + carry``): ``dn = dh (1 - z)``, ``dz = dh (h_{t-1} - n)``,
    ``da_n = dn (1 - n²)``, ``da_z = dz z(1-z)``, ``da_r = da_n R_n r(1-r)``;
    ``dA = [da_z, da_r, da_n]``, ``dR = [da_z, da_r, da_n r]``; carry ``dh z + dR W_hᵀ``.
    Params ``w_x (F, 3H)``, ``w_h (H, 3H)``, ``b (3H,)``, ``b_h (3H,)``.

    Args:
        hidden: the width ``H`` of the hidden state.
        kernel_init: initializer of ``w_x`` (default Glorot uniform).
        recurrent_init: initializer of ``w_h`` (default orthogonal).

    Shapes:
        ``x (B, T, F) -> y (B, T, H)``, every step's hidden state; pass ``(x, h0)`` to
        start from a given state, then the backward returns ``(d_x, d_h0)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    gates: int = dataclasses.field(default=3, init=False, repr=False)

    def init(self, key, inputs):
        params = super().init(key, inputs)
        return {**params, "b_h": jnp.zeros_like(params["b"])}

    def _extra_params(self):
        return {"b_h": (3 * self.hidden,)}

    def forward(self, params, inputs):
        x, h0 = self._split(inputs)
        self._check_params(params, x)
        h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype) if h0 is None else h0
        w_x, b, w_h, b_h, hd = params["w_x"], params["b"], params["w_h"], params["b_h"], self.hidden

        def step(h, x_t):
            a_t = x_t @ w_x + b
            r_all = h @ w_h + b_h
            z = _sigmoid(a_t[:, :hd] + r_all[:, :hd])
            r = _sigmoid(a_t[:, hd:2 * hd] + r_all[:, hd:2 * hd])
            n = jnp.tanh(a_t[:, 2 * hd:] + r * r_all[:, 2 * hd:])
            h_new = (1 - z) * n + z * h
            return h_new, (h_new, (z, r, n, r_all[:, 2 * hd:]))

        _, (hs, parts) = lax.scan(step, h0, self._time_major(x))
        return hs.swapaxes(0, 1), GRURes(x, h0, hs, parts, params["w_x"], w_h, isinstance(inputs, tuple))

    def tangent(self, res: GRURes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): with ``Ṙ_t = h_{t-1} ẇ_h + ḃ_h + ḣ_{t-1} W_h``,
        ``ż = z(1−z)(Ȧ_z + Ṙ_z)``, ``ṙ = r(1−r)(Ȧ_r + Ṙ_r)``, ``ṅ = (1−n²)(Ȧ_n + ṙ R_n + r Ṙ_n)``
        and ``ḣ_t = ż (h_{t-1} − n) + (1 − z) ṅ + z ḣ_{t-1}``: a forward scan carrying ``ḣ``."""
        return self._tangent_steps(res, d_params, d_x)[0].swapaxes(0, 1)

    def _tangent_steps(self, res: GRURes, d_params, d_x):
        """``(ḣ, (ż, ṙ, ṅ, Ṙ_n))`` of every step, time-major (``tangent``)."""
        a, h_prev, t_h0 = self._tangent_inputs(res, d_params, d_x)
        q, hd = h_prev @ d_params["w_h"] + d_params["b_h"], self.hidden

        def step(t_h, inp):
            a_t, q_t, hp, (z, r, n, r_n) = inp
            rr = q_t + t_h @ res.w_h
            t_z = z * (1 - z) * (a_t[:, :hd] + rr[:, :hd])
            t_r = r * (1 - r) * (a_t[:, hd:2 * hd] + rr[:, hd:2 * hd])
            t_n = (1 - n * n) * (a_t[:, 2 * hd:] + t_r * r_n + r * rr[:, 2 * hd:])
            t_h = t_z * (hp - n) + (1 - z) * t_n + z * t_h
            return t_h, (t_h, (t_z, t_r, t_n, rr[:, 2 * hd:]))

        return lax.scan(step, jnp.zeros_like(res.h0) if t_h0 is None else t_h0, (a, q, h_prev, res.parts))[1]

    def backward_tangent(self, res: GRURes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): the reverse scan differentiated along the forward's
        tangents (``_tangent_steps``), ``d_y`` held. With the backward's ``dh_t``, ``dA_t`` and
        ``dR_t`` (``_cotangents``), a reverse scan carries ``Ṙh_{t+1} z_{t+1} + Ṙ_{t+1} W_hᵀ`` and
        gives, per step, ``Ṙh_t`` = that carry ``+ dh_{t+1} ż_{t+1} + dR_{t+1} ẇ_hᵀ`` and

        * ``Ṙ_n = Ṙh (1−z)(1−n²) − dh ż (1−n²) − 2 dh (1−z) n ṅ``;
        * ``Ṙ_z = Ṙh (h_{t-1}−n) z(1−z) + dh (ḣ_{t-1}−ṅ) z(1−z) + dh (h_{t-1}−n) ż(1−2z)``;
        * ``Ṙ_r = Ṙ_n R_n r(1−r) + dA_n Ṙ_n' r(1−r) + dA_n R_n ṙ(1−2r)`` (``Ṙ_n'`` the tangent of ``R_n``);
        * the recurrent projection's ``n`` block ``Ṙ_n r + dA_n ṙ``;

        then the weights' terms ``x_tᵀ ṘA_t + ẋ_tᵀ dA_t`` and ``h_{t-1}ᵀ ṘR_t + ḣ_{t-1}ᵀ dR_t``, the
        biases' ``Σ ṘA_t`` and ``Σ ṘR_t``, the input's ``ṘA_t W_xᵀ + dA_t ẇ_xᵀ`` and the initial
        state's (the carry out of the first step)."""
        t_x, t_h0 = d_x if isinstance(d_x, tuple) else (d_x, None)
        t_h, (t_z, t_r, t_n, t_rn) = self._tangent_steps(res, d_params, d_x)
        _, dh, h_prev = self._reverse_scan(res, d_y)
        d_a, d_r = self._blocks(dh, h_prev, res.parts)
        z, r, n, r_n = res.parts
        w_h, v_h, zeros = res.w_h, d_params["w_h"], jnp.zeros_like(res.h0)
        t_prev = self._shifted(zeros if t_h0 is None else t_h0, t_h)
        d_r_all = jnp.concatenate(d_r, axis=-1)
        later = lambda a: jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])  # noqa: E731  (step t+1's, 0 after the last)
        extra = later(dh * t_z + d_r_all @ v_h.T)

        def step(carry, inp):
            e, dh, hp, t_hp, (z, r, n, r_n), (t_z, t_r, t_n, t_rn), da_n = inp
            r_h = carry + e
            r_an = r_h * (1 - z) * (1 - n * n) - dh * t_z * (1 - n * n) - 2 * dh * (1 - z) * n * t_n
            r_az = r_h * (hp - n) * z * (1 - z) + dh * (t_hp - t_n) * z * (1 - z) + dh * (hp - n) * t_z * (1 - 2 * z)
            r_ar = (r_an * r_n * r * (1 - r) + da_n * t_rn * r * (1 - r)
                    + da_n * r_n * t_r * (1 - 2 * r))
            r_rn = r_an * r + da_n * t_r
            out = r_h * z + jnp.concatenate([r_az, r_ar, r_rn], axis=-1) @ w_h.T
            return out, (r_az, r_ar, r_an, r_rn)

        inputs = (extra, dh, h_prev, t_prev, res.parts, (t_z, t_r, t_n, t_rn), d_a[2])
        r_h0, (r_az, r_ar, r_an, r_rn) = lax.scan(step, zeros, inputs, reverse=True)
        grads, s_x = self._weight_grads(res.x, res.w_x, (r_az, r_ar, r_an), h_prev, (r_az, r_ar, r_rn))
        moved, s_moved = self._weight_grads(jnp.zeros_like(res.x) if t_x is None else t_x, d_params["w_x"], d_a,
                                            t_prev, d_r)
        grads = {"w_x": grads["w_x"] + moved["w_x"], "w_h": grads["w_h"] + moved["w_h"], "b": grads["b"],
                 "b_h": jnp.concatenate([bias_grad(a) for a in (r_az, r_ar, r_rn)])}
        s_h0 = r_h0 + dh[0] * t_z[0] + d_r_all[0] @ v_h.T
        return grads, ((s_x + s_moved, s_h0) if res.has_carry else s_x + s_moved)

    @staticmethod
    def _gate_grads(dh, h_prev, z, r, n, r_n):
        """``(dA_z, dA_r, dA_n, dR_n)`` from the hidden-state cotangent ``dh`` of a step."""
        da_n = dh * (1 - z) * (1 - n * n)
        return dh * (h_prev - n) * z * (1 - z), da_n * r_n * r * (1 - r), da_n, da_n * r

    def _cotangents(self, res: GRURes, d_y):
        d_h0, dh, h_prev = self._reverse_scan(res, d_y)
        d_a, d_r = self._blocks(dh, h_prev, res.parts)
        return d_a, d_r, h_prev, d_h0

    def _blocks(self, dh, h_prev, parts):
        """``(dA, dR)``: the input and recurrent projections' cotangents from ``dh`` over all
        steps at once (they differ in the ``n`` block)."""
        da_z, da_r, da_n, dr_n = self._gate_grads(dh, h_prev, *parts)
        return (da_z, da_r, da_n), (da_z, da_r, dr_n)

    def _reverse_scan(self, res: GRURes, d_y):
        """``(d_h0, dh, h_prev)``: the backward's loop (it emits ``dh`` alone), time-major."""
        h0, hs, parts, w_h = res.h0, res.hs, res.parts, res.w_h
        h_prev = self._shifted(h0, hs)

        def step(dh_next, inp):
            t, hp_t, (z, r, n, r_n) = inp
            dh = _at(d_y, t) + dh_next
            da_z, da_r, _, dr_n = self._gate_grads(dh, hp_t, z, r, n, r_n)
            return dh * z + jnp.concatenate([da_z, da_r, dr_n], axis=-1) @ w_h.T, dh

        steps = jnp.arange(d_y.shape[1])
        d_h0, dh = lax.scan(step, jnp.zeros_like(h0), (steps, h_prev, parts), reverse=True)
        return d_h0, dh, h_prev
