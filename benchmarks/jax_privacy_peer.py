"""jax-privacy's DP-SGD step on fbp's network, for ``bench_per_example.py`` (a peer, never
imported by ``fbp``; ``pip install jax-privacy==2.0.0`` in a separate environment with fbp).

The step: ``jax_privacy.clipping.clipped_grad`` of the plain model's loss (per-example gradients
by ``vmap`` of ``grad``, each clipped to ``l2_clip`` and summed), Gaussian noise of standard
deviation ``σ·C`` from ``jax_privacy.noise_addition.gaussian_privatizer``, divided by the
batch size, and the same SGD update as fbp's candidates.
"""

import jax
from common import sgd
from jax_privacy import clipping, noise_addition


def clipped_sum(model, loss, l2_clip):
    """``(params, x, y) -> Σ_b clip(∇ℓ_b)``, jax-privacy's clipped gradient sum."""
    def per_example_loss(params, x, y):
        return loss(model.apply(params, x), y)

    return clipping.clipped_grad(per_example_loss, l2_clip_norm=l2_clip, batch_argnums=(1, 2))


def dp_step(model, loss, l2_clip, sigma, batch):
    """``(params, x, y, key) -> params``: one jax-privacy DP-SGD step (noise included)."""
    clipped = clipped_sum(model, loss, l2_clip)

    def step(params, x, y, key):
        total = clipped(params, x, y)
        privatizer = noise_addition.gaussian_privatizer(stddev=sigma * l2_clip, prng_key=key)
        noisy, _ = privatizer.update(total, privatizer.init(total))
        return sgd(params, jax.tree_util.tree_map(lambda g: g / batch, noisy))

    return jax.jit(step)
