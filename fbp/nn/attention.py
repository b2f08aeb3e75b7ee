"""Attention: multi-head self-attention and a pre-LayerNorm transformer block (positional
embeddings: ``fbp.nn.positional``).

Self-attention over ``x (B, T, d)`` with ``h`` heads of width ``k = d / h``::

    Q, K, V = x W_q + b_q, x W_k + b_k, x W_v + b_v          (split into heads: (B, h, T, k))
    S = Q Kᵀ / √k,  masked with -∞ where a key may not be seen (causal, padding)
    P = softmax(S) along the keys,   O = P V,   y = O W_o + b_o   (heads merged back to (B, T, d))

Backward, written out: ``dO = d_y W_oᵀ``; ``dP = dO Vᵀ``, ``dV = Pᵀ dO``;
``dS = P ⊙ (dP - Σ_keys dP ⊙ P) / √k`` (softmax's Jacobian; masked entries have P = 0 and get
nothing); ``dQ = dS K``, ``dK = dSᵀ Q``. Every weight gradient is one 2-D matmul
over all ``B·T`` rows, ``W_grad = x_flatᵀ dQ_flat``, and ``d_x = dQ W_qᵀ + dK W_kᵀ + dV W_vᵀ``.

A padding mask travels with the input: ``apply(params, (x, mask))`` with ``mask (B, T)`` True
for real tokens; the input cotangent is then ``(d_x, None)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fbp.core import InputError, Layer, check_params, describe, require_floating
from fbp.linear_pass import add, tangent
from fbp.nn import init as initializers
from fbp.nn.activations import GELU
from fbp.nn.dense import Dense, bias_grad
from fbp.nn.norm import LayerNorm
from fbp.nn.positions import Positions
from fbp.second_order import second_order
from fbp.validation import check_fields

_NAMES = ("q", "k", "v", "o")


def _split_input(owner, inputs):
    x, mask = inputs if isinstance(inputs, tuple) else (inputs, None)
    require_floating(repr(owner), x)
    if x.ndim != 3:
        raise InputError(repr(owner), f"input x must be (batch, time, model_dim), received {describe(x)}")
    if x.shape[1] == 0:
        raise InputError(repr(owner), f"received a sequence of length 0, {describe(x)}: attention needs at least one "
                                      f"token to attend to")
    if mask is not None and (not hasattr(mask, "dtype") or mask.dtype != jnp.bool_
                             or tuple(mask.shape) != tuple(x.shape[:2])):
        raise InputError(repr(owner), f"padding mask must be (batch, time) = {tuple(x.shape[:2])} booleans, True "
                                      f"for real tokens; received {describe(mask)}"
                                      + ("; convert it with mask > 0 (or mask.astype(bool))"
                                         if hasattr(mask, "dtype") and mask.dtype != jnp.bool_ else ""))
    return x, mask


def _flat(a):
    return a.reshape(-1, a.shape[-1])


def _where_allowed(allowed, a):
    """``a`` with the scores that were masked out set to 0: a query that may see no key has
    uniform weights over the masked ones (``S`` is constant there), and no score moves."""
    return a if allowed is None else jnp.where(allowed, a, 0)


class AttentionRes(NamedTuple):
    """What attention's backward keeps: the input, the scaled queries, keys, values (``(B, h, T, k)``),
    the attention weights ``p`` (``(B, h, T, T)``), the heads' merged output ``o``, the scale
    ``1/√k``, the projection kernels by name, whether the input carried a padding mask, and
    which scores were allowed (``_allowed``; ``None`` when all were)."""

    x: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    p: jax.Array
    o: jax.Array
    scale: float
    w: dict
    has_mask: bool
    allowed: Any = None


class TransformerBlockRes(NamedTuple):
    """A transformer block's residuals: each part's own, the width ``d`` and whether a mask came in."""

    ln1: tuple
    attention: AttentionRes
    ln2: tuple
    mlp_in: tuple
    gelu: tuple
    mlp_out: tuple
    d: int
    has_mask: bool


@dataclasses.dataclass(frozen=True)
class MultiHeadAttention(Layer):
    """Multi-head self-attention (Vaswani et al., 2017); model width taken from the input.

    Params ``{"w_q", "w_k", "w_v", "w_o": (d, d), "b_q", "b_k", "b_v", "b_o": (d,)}``.
    ``causal=True`` lets step ``t`` attend only to steps ``<= t``.

    Args:
        num_heads: ``h``, which must divide the width ``d``.
        causal: let step ``t`` attend only to steps ``<= t``.
        kernel_init: initializer of the four projections (default Glorot uniform).

    Shapes:
        ``x (B, T, d) -> y (B, T, d)``; or ``(x, mask)`` with a boolean padding mask ``(B, T)``
        (``True`` for keys that may be attended to), then the backward returns ``(d_x, None)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    num_heads: int
    causal: bool = False
    kernel_init: Callable = initializers.glorot_uniform

    def __repr__(self) -> str:
        return f"MultiHeadAttention(num_heads={self.num_heads}{', causal=True' if self.causal else ''})"

    def __post_init__(self):
        check_fields(self)
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"MultiHeadAttention: num_heads must be a positive int, got {self.num_heads!r}")

    def init(self, key, inputs):
        x, _ = _split_input(self, inputs)
        d = self._width(x)
        keys = jax.random.split(key, 4)
        params = {f"w_{n}": self.kernel_init(k, (d, d), x.dtype) for n, k in zip(_NAMES, keys, strict=True)}
        params.update({f"b_{n}": jnp.zeros((d,), x.dtype) for n in _NAMES})
        return params

    def _width(self, x):
        d = x.shape[-1]
        if d % self.num_heads:
            raise InputError(repr(self), f"model_dim {d} must be divisible by num_heads {self.num_heads}")
        return d

    def _heads(self, a):  # (B, T, d) -> (B, h, T, k)
        b, t, d = a.shape
        return a.reshape(b, t, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    @staticmethod
    def _merge(a):  # (B, h, T, k) -> (B, T, d)
        b, h, t, k = a.shape
        return a.transpose(0, 2, 1, 3).reshape(b, t, h * k)

    def _allowed(self, t, mask):
        """Boolean (B or 1, 1, T, T): may query i see key j? ``None`` when every key is allowed (then
        no mask is applied: a constant all-allowed mask made XLA keep a (T, T) fill array alive)."""
        if not self.causal and mask is None:
            return None
        allowed = jnp.ones((1, 1, t, t), bool)
        if self.causal:
            allowed = allowed & jnp.tril(jnp.ones((t, t), bool))[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        return allowed

    def forward(self, params, inputs):
        x, mask = _split_input(self, inputs)
        d = self._width(x)
        check_params(repr(self), params, {f"{kind}_{name}": (d, d) if kind == "w" else (d,)
                                          for name in _NAMES for kind in ("w", "b")}, x)
        q, k, v = (self._heads(x @ params[f"w_{n}"] + params[f"b_{n}"]) for n in "qkv")
        scale = 1.0 / math.sqrt(d // self.num_heads)
        q = q * scale  # scaled before the (B, h, T, T) product: scaling S made XLA keep a fill array alive
        s = jnp.einsum("bhqk,bhjk->bhqj", q, k)
        allowed = self._allowed(x.shape[1], mask)
        if allowed is not None:
            s = jnp.where(allowed, s, jnp.finfo(s.dtype).min)
        s = s.astype(jnp.promote_types(s.dtype, jnp.float32))  # the softmax in at least float32
        s = s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))
        e = jnp.exp(s)
        p = (e / e.sum(axis=-1, keepdims=True)).astype(q.dtype)
        o = self._merge(jnp.einsum("bhqj,bhjk->bhqk", p, v))
        y = o @ params["w_o"] + params["b_o"]
        kernels = {n: params[f"w_{n}"] for n in _NAMES}
        return y, AttentionRes(x, q, k, v, p, o, scale, kernels, isinstance(inputs, tuple), allowed)

    def _cotangents(self, res: AttentionRes, d_y):
        """``(d_q, d_k, d_v)``: the cotangents of the three input projections, ``(B, T, d)`` each."""
        q, k, v, p, scale, w = res.q, res.k, res.v, res.p, res.scale, res.w
        d_o = self._heads(d_y @ w["o"].T)
        d_p = jnp.einsum("bhqk,bhjk->bhqj", d_o, v)
        d_v = jnp.einsum("bhqj,bhqk->bhjk", p, d_o)
        d_s = _where_allowed(res.allowed, p * (d_p - (d_p * p).sum(axis=-1, keepdims=True)))
        d_q = jnp.einsum("bhqj,bhjk->bhqk", d_s, k) * scale  # q in the residuals is already scaled
        d_k = jnp.einsum("bhqj,bhqk->bhjk", d_s, q)
        return tuple(self._merge(d) for d in (d_q, d_k, d_v))

    def backward(self, res: AttentionRes, d_y):
        x, o, w, has_mask = res.x, res.o, res.w, res.has_mask
        x2 = _flat(x)
        grads = {"w_o": _flat(o).T @ _flat(d_y), "b_o": bias_grad(d_y)}
        d_x = 0
        for name, d in zip("qkv", self._cotangents(res, d_y), strict=True):
            d2 = _flat(d)
            grads[f"w_{name}"] = x2.T @ d2
            grads[f"b_{name}"] = bias_grad(d2)
            d_x = d_x + d2 @ w[name].T
        d_x = d_x.reshape(x.shape)
        return grads, ((d_x, None) if has_mask else d_x)

    def _tangents(self, res: AttentionRes, d_params, d_x):
        """``(q̇, k̇, v̇, ṗ, ȯ)``: the forward's tangents (``tangent``'s docstring), heads split except ``ȯ``."""
        x, q, k, v, p, o, scale, w, _, allowed = res

        def projection(name):
            t = x @ d_params[f"w_{name}"] + d_params[f"b_{name}"]
            return self._heads(t if d_x is None else t + d_x @ w[name])

        t_q, t_k, t_v = projection("q") * scale, projection("k"), projection("v")
        t_s = _where_allowed(allowed, jnp.einsum("bhqk,bhjk->bhqj", t_q, k) + jnp.einsum("bhqk,bhjk->bhqj", q, t_k))
        t_p = p * (t_s - (t_s * p).sum(axis=-1, keepdims=True))
        t_o = self._merge(jnp.einsum("bhqj,bhjk->bhqk", t_p, v) + jnp.einsum("bhqj,bhjk->bhqk", p, t_v))
        return t_q, t_k, t_v, t_p, t_o

    def tangent(self, res: AttentionRes, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): with ``ṫ`` a tangent, the projections
        ``q̇ = (x ẇ_q + ḃ_q + ẋ w_q)/√k`` (likewise ``k̇, v̇``), the scores ``ṡ = q̇ kᵀ + q k̇ᵀ``, the
        weights ``ṗ = p ⊙ (ṡ − Σ_j p ṡ)`` (softmax's Jacobian; a masked score has ``p = 0`` and no
        tangent), the heads ``ȯ = ṗ v + p v̇`` and ``ẏ = ȯ w_o + o ẇ_o + ḃ_o``."""
        d_x = d_x[0] if isinstance(d_x, tuple) else d_x  # (x, mask): the mask has no tangent
        t_o = self._tangents(res, d_params, d_x)[4]
        return t_o @ res.w["o"] + res.o @ d_params["w_o"] + d_params["b_o"]

    def backward_tangent(self, res: AttentionRes, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): the derivative of ``backward`` as the forward moves
        along ``(ẇ, ẋ)`` (``_tangents``), ``d_y`` held. With ``D`` the backward's cotangents
        (``_cotangents``; heads split):

        * ``Ḋ_o = d_y ẇ_oᵀ``, ``Ḋ_p = Ḋ_o vᵀ + D_o v̇ᵀ``, ``Ḋ_v = ṗᵀ D_o + pᵀ Ḋ_o``;
        * ``Ḋ_s = ṗ ⊙ (D_p − Σ_j p D_p) + p ⊙ (Ḋ_p − Σ_j (p Ḋ_p + ṗ D_p))``;
        * ``Ḋ_q = (Ḋ_s k + D_s k̇)/√k``, ``Ḋ_k = Ḋ_sᵀ q + D_sᵀ q̇`` (``q`` scaled);
        * ``ẇ_o``'s gradient ``ȯᵀ d_y``; ``w_n``'s ``ẋᵀ D_n + xᵀ Ḋ_n``; ``b_n``'s ``Σ Ḋ_n``;
          ``d_x``'s ``Σ_n Ḋ_n w_nᵀ + D_n ẇ_nᵀ`` (``n`` = q, k, v; ``b_o``'s is zero).
        """
        x, q, k, v, p, o, scale, w, has_mask, allowed = res
        t_x = d_x[0] if isinstance(d_x, tuple) else d_x
        t_q, t_k, t_v, t_p, t_o = self._tangents(res, d_params, t_x)
        d_o, r_o = self._heads(d_y @ w["o"].T), self._heads(d_y @ d_params["w_o"].T)
        d_p = jnp.einsum("bhqk,bhjk->bhqj", d_o, v)
        r_p = jnp.einsum("bhqk,bhjk->bhqj", r_o, v) + jnp.einsum("bhqk,bhjk->bhqj", d_o, t_v)
        r_v = jnp.einsum("bhqj,bhqk->bhjk", t_p, d_o) + jnp.einsum("bhqj,bhqk->bhjk", p, r_o)
        centred = d_p - (d_p * p).sum(axis=-1, keepdims=True)
        d_s = _where_allowed(allowed, p * centred)
        r_s = _where_allowed(allowed, t_p * centred + p * (r_p - (r_p * p + d_p * t_p).sum(axis=-1, keepdims=True)))
        r_q = (jnp.einsum("bhqj,bhjk->bhqk", r_s, k) + jnp.einsum("bhqj,bhjk->bhqk", d_s, t_k)) * scale
        r_k = jnp.einsum("bhqj,bhqk->bhjk", r_s, q) + jnp.einsum("bhqj,bhqk->bhjk", d_s, t_q)
        grads = {"w_o": _flat(t_o).T @ _flat(d_y), "b_o": jnp.zeros_like(d_params["b_o"])}
        s_x = 0
        for name, d, r in zip("qkv", self._cotangents(res, d_y), (r_q, r_k, r_v), strict=True):
            d2, r2 = _flat(d), _flat(self._merge(r))
            grads[f"w_{name}"] = _flat(x).T @ r2 if t_x is None else _flat(x).T @ r2 + _flat(t_x).T @ d2
            grads[f"b_{name}"] = bias_grad(r2)
            s_x = s_x + r2 @ w[name].T + d2 @ d_params[f"w_{name}"].T
        s_x = s_x.reshape(x.shape)
        return grads, ((s_x, None) if has_mask else s_x)

    def per_example_positions(self, res, d_y):
        """Per-example rule (``fbp.nn.positions``): each projection is used at every token —
        ``w_q, w_k, w_v`` on the input with the cotangents of q, k, v; ``w_o`` on the heads' output."""
        x, o = res.x, res.o
        d = x.shape[-1]
        groups = [Positions((((f"w_{n}",), [x], (d, d)),), g, (f"b_{n}",))
                  for n, g in zip("qkv", self._cotangents(res, d_y), strict=True)]
        return groups + [Positions(((("w_o",), [o], (d, d)),), d_y, ("b_o",))], {}


@dataclasses.dataclass(frozen=True)
class TransformerBlock(Layer):
    """Pre-LayerNorm transformer block: ``h = x + MHA(LN(x))``, ``y = h + W₂ GELU(W₁ LN(h))``.

    The backward runs the pieces' own rules in reverse; each residual adds its skip
    cotangent. Params ``{"ln1", "attention", "ln2", "mlp_in", "mlp_out"}``. Accepts ``x`` or
    ``(x, padding_mask)`` like ``MultiHeadAttention``.

    Args:
        num_heads: heads of the attention.
        mlp_dim: the hidden width of the MLP.
        causal: causal attention.

    Shapes:
        ``x (B, T, d) -> y (B, T, d)``.
    """
    independent_examples = True  # each example's output and input cotangent are its own

    num_heads: int
    mlp_dim: int
    causal: bool = False

    def _parts(self, d):
        return {"ln1": LayerNorm(), "attention": MultiHeadAttention(self.num_heads, self.causal),
                "ln2": LayerNorm(), "mlp_in": Dense(self.mlp_dim), "gelu": GELU(), "mlp_out": Dense(d)}

    def init(self, key, inputs):
        x, mask = _split_input(self, inputs)
        parts = self._parts(x.shape[-1])
        keys = dict(zip(parts, jax.random.split(key, len(parts)), strict=True))
        hidden = jax.ShapeDtypeStruct((*x.shape[:-1], self.mlp_dim), x.dtype)
        example = {"attention": inputs, "mlp_out": hidden}
        return {name: parts[name].init(keys[name], example.get(name, x)) for name in parts if name != "gelu"}

    def forward(self, params, inputs):
        x, mask = _split_input(self, inputs)
        parts = self._parts(x.shape[-1])
        a_in, r_ln1 = parts["ln1"].forward(params["ln1"], x)
        a, r_att = parts["attention"].forward(params["attention"], a_in if mask is None else (a_in, mask))
        h = x + a
        m, r_ln2 = parts["ln2"].forward(params["ln2"], h)
        m, r_in = parts["mlp_in"].forward(params["mlp_in"], m)
        m, r_gelu = parts["gelu"].forward({}, m)
        m, r_out = parts["mlp_out"].forward(params["mlp_out"], m)
        return h + m, TransformerBlockRes(r_ln1, r_att, r_ln2, r_in, r_gelu, r_out, x.shape[-1], mask is not None)

    def backward(self, res, d_y):
        return self._backward(res, d_y)[:2]

    def _backward(self, res, d_y):
        """``(grads, d_x, seen)``: ``seen[name] = (part, residuals, output cotangent)`` for every
        part with parameters (what ``per_example_positions`` reads)."""
        r_ln1, r_att, r_ln2, r_in, r_gelu, r_out, d, has_mask = res
        parts, grads, seen = self._parts(d), {}, {}

        def back(name, r, g):
            seen[name] = (parts[name], r, g)
            grads[name], g = parts[name].backward(r, g)
            return g

        g = back("mlp_out", r_out, d_y)
        _, g = parts["gelu"].backward(r_gelu, g)
        g = back("ln2", r_ln2, back("mlp_in", r_in, g))
        d_h = d_y + g
        g = back("attention", r_att, d_h)
        if has_mask:
            g = g[0]
        d_x = d_h + back("ln1", r_ln1, g)
        return grads, ((d_x, None) if has_mask else d_x), seen

    def _part_tangents(self, res, v, d_x):
        """The tangents entering each part, in the forward's order: ``(ln1, attention, ln2,
        mlp_in, gelu, mlp_out)``, each skip adding its input's tangent (``None``: zero)."""
        r_ln1, r_att, r_ln2, r_in, r_gelu, _, d, _ = res
        parts = self._parts(d)
        t_x = d_x[0] if isinstance(d_x, tuple) else d_x
        t_att = tangent(parts["ln1"], r_ln1, v["ln1"], t_x)
        t_h = add(t_x, tangent(parts["attention"], r_att, v["attention"], t_att))
        t_in = tangent(parts["ln2"], r_ln2, v["ln2"], t_h)
        t_gelu = tangent(parts["mlp_in"], r_in, v["mlp_in"], t_in)
        return t_x, t_att, t_h, t_in, t_gelu, tangent(parts["gelu"], r_gelu, {}, t_gelu)

    def tangent(self, res, d_params, d_x):
        """Forward mode (``fbp.linear_pass``): its parts' tangent rules in the forward's order,
        each skip adding its input's tangent."""
        _, _, t_h, _, _, t_out = self._part_tangents(res, d_params, d_x)
        return add(t_h, tangent(self._parts(res.d)["mlp_out"], res.mlp_out, d_params["mlp_out"], t_out))

    def backward_tangent(self, res, d_params, d_x, d_y):
        """Second order (``fbp.second_order``): its parts' terms in turn — the parts' input
        tangents first to last, then their R-backward last to first with ``R{d_y} = 0`` (the
        block's backward is linear in its cotangent, so that leaves the second-order terms only)."""
        r_ln1, r_att, r_ln2, r_in, r_gelu, r_out, d, has_mask = res
        parts, v = self._parts(d), d_params
        t_x, t_att, t_h, t_in, t_gelu, t_out = self._part_tangents(res, v, d_x)
        out = {}
        out["mlp_out"], g, r = second_order(parts["mlp_out"], r_out, v["mlp_out"], t_out, d_y, jnp.zeros_like(d_y))
        _, g, r = second_order(parts["gelu"], r_gelu, {}, t_gelu, g, r)
        out["mlp_in"], g, r = second_order(parts["mlp_in"], r_in, v["mlp_in"], t_in, g, r)
        out["ln2"], g, r_h = second_order(parts["ln2"], r_ln2, v["ln2"], t_h, g, r)
        out["attention"], g, r = second_order(parts["attention"], r_att, v["attention"], t_att, d_y + g, r_h)
        if has_mask:
            g, r = g[0], r[0]
        out["ln1"], _, r = second_order(parts["ln1"], r_ln1, v["ln1"], t_x, g, r)
        return out, ((r_h + r, None) if has_mask else r_h + r)

    def per_example_positions(self, res, d_y):
        """Per-example rule (``fbp.nn.positions``): its parts' own, keys under the part's name."""
        groups, rest = [], {}
        for name, (part, r, g) in self._backward(res, d_y)[2].items():
            part_groups, part_rest = part.per_example_positions(r, g)
            groups += [Positions(tuple(((name, *key), ps, shape) for key, ps, shape in grp.kernels), grp.g,
                                 None if grp.bias is None else (name, *grp.bias)) for grp in part_groups]
            rest.update({(name, *key): value for key, value in part_rest.items()})
        return groups, rest
