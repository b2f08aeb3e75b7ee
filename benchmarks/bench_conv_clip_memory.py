"""Issue 30's CNN memory target, one layer: three ways to clip per-example kernel gradients.

The workload is the second convolution of `bench_per_example.py`'s CNN: 3×3 SAME, 32 → 64 channels,
on `(128, 14, 14, 32)`, with a random output cotangent. Each way returns the clipped sum
`Σ_b min(1, C/‖G_b‖) G_b` of the per-example kernel gradients `G_b` and their norms.

- **materialised** was fbp's route until 2026-12-05. It builds the nine shifted windows
  `(B, 196, 32)`, then `G` by one batched dot per tap, and keeps all of it live.
- **looped** loops over the taps and keeps only the squared norms. The clipped sum is then
  fbp's kernel-gradient convolution (`conv_ops.conv_kernel_grad`) of the rescaled cotangent
  `c_b d_y_b`: less memory, one more convolution.
- **looped_store** loops over the taps too, but writes each tap's `(B, 32, 64)` block into `G`. It
  never holds more than one window, and `G` is summed with the clip factors as before. fbp now
  does this (`fbp.nn.conv_ops.ConvWindows`, `fbp.nn.positions.LoopedParts`) for windows wider
  than `IM2COL_MAX_WIDTH`.

Run: `python benchmarks/bench_conv_clip_memory.py [--runs 3]`. It prints XLA's temporary memory
and, per run, the median time of interleaved rounds, with each way's ratio to materialised.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from common import interleaved, temp_bytes
from jax import lax

import fbp  # noqa: F401  (the XLA flag and malloc thresholds fbp sets at import)
from fbp.nn.conv_ops import conv_kernel_grad, conv_windows

B, H, W, C, C_OUT, CLIP = 128, 14, 14, 32, 64, 1.0
PADS = ((1, 1), (1, 1))  # SAME for a 3×3 kernel


def materialised(x, dy):
    g3 = dy.reshape(B, -1, C_OUT)
    windows = conv_windows(x, (3, 3, C, C_OUT), (1, 1), PADS, (1, 1), (H, W))  # fbp's own, one per tap
    g = jnp.concatenate([jnp.einsum("bpc,bpo->bco", w, g3) for w in windows], axis=1)
    n = jnp.sqrt(jnp.sum(g ** 2, axis=(1, 2)))
    return jnp.tensordot(jnp.minimum(1.0, CLIP / n), g, 1).reshape(3, 3, C, C_OUT), n


def looped(x, dy):
    xp, g3 = jnp.pad(x, ((0, 0), *PADS, (0, 0))), dy.reshape(B, -1, C_OUT)

    def body(t, acc):
        w = lax.dynamic_slice(xp, (0, t // 3, t % 3, 0), (B, H, W, C)).reshape(B, -1, C)
        return acc + jnp.sum(jnp.einsum("bpc,bpo->bco", w, g3) ** 2, axis=(1, 2))

    n = jnp.sqrt(lax.fori_loop(0, 9, body, jnp.zeros(B, x.dtype)))
    scaled = dy * jnp.minimum(1.0, CLIP / n)[:, None, None, None]  # fbp's kernel gradient of c_b d_y_b
    return conv_kernel_grad(x, scaled, (3, 3, C, C_OUT), (1, 1), PADS, (1, 1), (1, 1), 1), n


def looped_store(x, dy):
    xp, g3 = jnp.pad(x, ((0, 0), *PADS, (0, 0))), dy.reshape(B, -1, C_OUT)

    def body(t, g):
        w = lax.dynamic_slice(xp, (0, t // 3, t % 3, 0), (B, H, W, C)).reshape(B, -1, C)
        return lax.dynamic_update_slice(g, jnp.einsum("bpc,bpo->bco", w, g3)[None], (t, 0, 0, 0))

    g = lax.fori_loop(0, 9, body, jnp.zeros((9, B, C, C_OUT), x.dtype))
    n = jnp.sqrt(jnp.sum(g ** 2, axis=(0, 2, 3)))
    return jnp.einsum("b,tbco->tco", jnp.minimum(1.0, CLIP / n), g).reshape(3, 3, C, C_OUT), n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    kx, kg = jax.random.split(jax.random.PRNGKey(0))
    x, dy = jax.random.normal(kx, (B, H, W, C)), jax.random.normal(kg, (B, H, W, C_OUT))
    ways = {f.__name__: jax.jit(f) for f in (materialised, looped, looped_store)}
    reference = ways["materialised"](x, dy)
    for name, f in ways.items():
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(f(x, dy), reference))
        print(f"{name:13s} max relative difference to materialised {err:.1e}, "
              f"XLA temp memory {temp_bytes(f, x, dy) / 2 ** 20:.1f} MiB")
    for run in range(args.runs):
        t = interleaved({name: (lambda f=f: f(x, dy)) for name, f in ways.items()}, rounds=args.rounds,
                        reps=args.reps)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / t['materialised']:.2f})"
                                            for k, v in t.items()))


if __name__ == "__main__":
    main()
