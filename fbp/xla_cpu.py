"""The one XLA flag ``import fbp`` sets: convolutions on the CPU by XLA's own kernels, not YNNPACK.

jaxlib 0.10 and 0.11 hand every convolution on an x86 CPU to YNNPACK (the ``ynn_fusion`` ops
of a profile). At the shapes of a small CNN that is several times slower than XLA's own
(Eigen) convolution, which the flag ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
restores while leaving YNNPACK's matmuls alone. Measured on this project's 2-core CPU
(``benchmarks/bench_xla_cpu_flags.py``, which runs each setting in its own processes):

* the forward of a 3×3 convolution 64 → 96 channels on ``(128, 14, 14, 64)``: 43 ms with
  YNNPACK, 10 ms without;
* a whole training step: the CNN of ``bench_cnn.py`` and 3C3D (Cockpit's network) — see the
  performance page for the ranges.

Results change only by floating-point rounding (a different summation order).

**When it is applied.** At ``import fbp``, the flag is appended to the environment variable
``XLA_FLAGS`` — which XLA reads once, when JAX creates its first backend — unless:

* ``XLA_FLAGS`` already says something about ``xla_cpu_experimental_ynn_fusion_type`` (your
  setting wins);
* ``FBP_XLA_CPU_FLAGS=0`` is set (opt out);
* the installed jaxlib is outside the versions it was measured on (``SUPPORTED``): the flag is
  experimental, and XLA refuses to start on a flag it does not know.

If JAX has already created a backend when fbp is imported (``jax.devices()`` was called
first), the flag is still appended but has no effect in that process; it reaches child
processes, which inherit the environment. ``active()`` says whether it is in effect.
"""

from __future__ import annotations

import functools
import os

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
SUPPORTED = ((0, 10), (0, 12))  # jaxlib versions [0.10, 0.12): the flag exists and was measured there
OPT_OUT = "FBP_XLA_CPU_FLAGS"

__all__ = ["FLAG", "SUPPORTED", "OPT_OUT", "apply", "active", "native_convolutions"]


def _jaxlib_version() -> tuple[int, int]:
    from jaxlib import version

    major, minor = version.__version__.split(".")[:2]
    return int(major), int(minor)


def apply(environ=None) -> bool:
    """Append ``FLAG`` to ``XLA_FLAGS`` unless the module docstring's conditions say not to.

    Args:
        environ: the environment mapping to edit (default ``os.environ``).

    Returns:
        Whether the flag was appended.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if env.get(OPT_OUT, "1") == "0" or "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    if not SUPPORTED[0] <= _jaxlib_version() < SUPPORTED[1]:
        return False
    env["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True


def active() -> bool:
    """Whether this process's XLA runs its convolutions on its own CPU kernels: a compiled
    convolution is not a YNNPACK fusion (also true off the CPU, or where YNNPACK is absent).

    Returns:
        ``True`` when convolutions run on XLA's own CPU kernels.
    """
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, 14, 14, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 96), jnp.float32)
    text = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=(
        "NHWC", "HWIO", "NHWC"))).lower(x, w).compile().as_text()
    return '"__ynn_fusion"' not in text  # the fusion kind in the backend config


@functools.cache
def native_convolutions() -> bool:
    """``active()``, computed once per process: ``fbp.nn.conv`` asks it at trace time to pick a
    convolution's kernel gradient. Where convolutions are XLA's own (the flag, or a GPU), XLA's
    kernel-gradient convolution is the faster one; where they are YNNPACK's, fbp's shifted-window
    matmuls are (``fbp.nn.conv_ops``).

    Returns:
        Whether convolutions run on XLA's own kernels.
    """
    return active()
