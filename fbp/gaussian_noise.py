"""DP-SGD's Gaussian noise, fused into its consumer instead of materialised.

DP-SGD adds ``σ C z`` with ``z ~ N(0, I)`` to the clipped gradient sum: one standard normal per
parameter, 2.9 million a step for a 784-1024³-10 MLP, where ``jax.random.normal`` costs about
0.45 of the plain step on this project's 2-core CPU and 22 MiB of temporary memory. Two things
make it so. JAX's CPU lowering of the Threefry-2x32 hash is a rolled ``while`` loop over whole
counter arrays, which materialises both output words of every block; and JAX's default,
*partitionable* layout hashes one block ``(hi(i), lo(i))`` per entry ``i`` (64-bit counter
arithmetic) and XORs the block's two words into one entry.

``normal`` writes the same 20-round hash as elementwise ``uint32`` operations, which XLA fuses
with the transform and with whatever consumes the noise (the noisy mean, the optimizer's
update): nothing is materialised. Its counters are JAX's original (non-partitionable) layout:
with ``n`` entries and ``m = ⌈n/2⌉`` blocks, block ``j`` hashes the pair ``(j, m + j)``
(``(m-1, 0)`` for the last block when ``n`` is odd); its first word becomes entry ``j`` and its
second entry ``m + j``. The transform is JAX's own: 23 mantissa bits give ``u ∈ [-1+ε, 1)`` and
``z = √2 erf⁻¹(u)``. So ``normal(key, shape)`` is *bitwise* ``jax.random.normal(key, shape)``
under ``jax.threefry_partitionable(False)``, which the tests check. Inside the fused loop each
entry evaluates its block's hash, so the hash is evaluated as often as in the default draw; the
gain is the memory traffic. Measured (``benchmarks/bench_per_example.py`` and the performance
page): the MLP's 2.9M entries with an SGD update 6.8–8.3 ms against 9.8–11.0 ms, temporary
memory 0 against 22 MiB.

**Why the privacy guarantee is unchanged.** The accountant's Gaussian mechanism needs each
step's noise to be ``N(0, σ²C²I)``, independent of the data and of every other step's noise.
The noise is still Threefry-2x32 (20 rounds) in counter mode under a key used for nothing else
(each leaf's key is split from the step's noise key, itself folded from the step's key with
its own tag); distinct blocks have distinct counters and every output word feeds exactly one
entry. Under the assumption every JAX user already makes — that Threefry's outputs on distinct
counters are indistinguishable from independent uniform words — the entries are independent
and each has exactly the distribution of ``jax.random.normal``'s (the same transform of 23
uniform bits). XOR-ing two such words, as the partitionable draw does, adds no randomness
under that assumption. What this does not address, before or after: Threefry is not a vetted
cryptographic generator (Opacus' ``secure_mode`` uses one), and floating-point Gaussian samples
carry the known finite-precision caveats (Mironov 2012; Jin et al. 2022); fbp, like
jax-privacy and Opacus outside ``secure_mode``, does not defend against those.

How the draw is laid out matters to XLA's CPU code generator: a reshape from the flat
``(n,)`` draw into a 2-D leaf *inside* the fusion that evaluates ``erf⁻¹`` runs 3–4× slower
than the draw itself, so a leaf with an even leading axis hashes counters in its own shape
(two half-leaves, joined along axis 0), and any other leaf reshapes the hashed words, behind an
optimisation barrier, before the transform. Other dtypes and key implementations are drawn by
``jax.random.normal`` under ``jax.threefry_partitionable(False)``, so every dtype keeps the
same layout.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["normal", "noisy_mean"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_LOW = np.nextafter(np.float32(-1), np.float32(0))  # jax.random.normal's lower end for u


def _uniform_to_normal(bits):
    """JAX's float32 transform: 23 bits → ``u ∈ [-1+ε, 1)`` → ``√2 erf⁻¹(u)``."""
    unit = lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - np.float32(1)
    u = lax.max(_LOW, unit * (np.float32(1) - _LOW) + _LOW)
    return np.float32(math.sqrt(2)) * lax.erf_inv(u)


def _threefry2x32(key0, key1, count0, count1):
    """Threefry-2x32 with 20 rounds (Salmon et al., 2011) as elementwise ``uint32`` ops, which XLA
    fuses into the transform (JAX's CPU lowering of the same hash is a rolled ``while`` loop that
    materialises both words); the tests check the two agree bit for bit."""
    keys = (key0, key1, key0 ^ key1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = count0 + keys[0], count1 + keys[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0 = x0 + keys[(i + 1) % 3]
        x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _fast(key, shape, dtype) -> bool:
    n = math.prod(shape)
    if jnp.dtype(dtype) != jnp.float32 or not 0 < n < 2**32:
        return False
    typed = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    return str(jax.random.key_impl(typed)) == "threefry2x32"


def normal(key, shape, dtype=jnp.float32):
    """Standard normal entries of ``shape``: bitwise ``jax.random.normal(key, shape, dtype)``
    under ``jax.threefry_partitionable(False)``, with both words of every Threefry block used.

    Args:
        key: a JAX PRNG key (typed, or raw ``uint32[2]``).
        shape: the output's shape.
        dtype: a floating dtype; float32 with a Threefry key takes the fast path.

    Returns:
        An array of ``shape`` and ``dtype``.
    """
    shape = tuple(int(d) for d in shape)
    if not _fast(key, shape, dtype):
        with jax.threefry_partitionable(False):
            return jax.random.normal(key, shape, dtype)
    data = jax.random.key_data(key)
    n = math.prod(shape)
    m = (n + 1) // 2
    if shape and shape[0] % 2 == 0:  # counters in the half-leaf's own shape: no reshape next to erf⁻¹
        half = (shape[0] // 2, *shape[1:])
        counter = lax.broadcasted_iota(jnp.uint32, half, 0)
        for axis in range(1, len(half)):
            counter = counter * np.uint32(half[axis]) + lax.broadcasted_iota(jnp.uint32, half, axis)
        first, second = _threefry2x32(data[0], data[1], counter, counter + np.uint32(m))
        return jnp.concatenate([_uniform_to_normal(first), _uniform_to_normal(second)], axis=0)
    counter = lax.iota(jnp.uint32, m)
    partner = counter + np.uint32(m)
    if n % 2:  # JAX pads the odd count with one zero: the last block is (m - 1, 0)
        partner = jnp.where(counter == m - 1, np.uint32(0), partner)
    first, second = _threefry2x32(data[0], data[1], counter, partner)
    bits = jnp.concatenate([first, second])[:n].reshape(shape)
    return _uniform_to_normal(lax.optimization_barrier(bits))


def noisy_mean(key, sums, stddev, divisor):
    """DP-SGD's noisy mean: ``(s + stddev · z) / divisor`` for every leaf ``s`` of ``sums``.

    Args:
        key: the noise key; leaf ``i`` draws its ``z ~ N(0, I)`` from
            ``jax.random.split(key, leaves)[i]`` (one key even for no leaves).
        sums: a pytree of arrays (the clipped gradient sum).
        stddev: the noise's standard deviation ``σ C``.
        divisor: the expected batch size ``B̄``.

    Returns:
        A pytree like ``sums``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(sums)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [(s + stddev * normal(k, s.shape, s.dtype)) / divisor for s, k in zip(leaves, keys, strict=False)]
    return jax.tree_util.tree_unflatten(treedef, noisy)
