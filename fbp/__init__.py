"""fbp — functional backpropagation for JAX.

Every layer, activation and loss carries a hand-written backward (VJP) rule beside its
forward; ``value_and_grad`` composes them; ``fbp.check`` holds each rule to
JAX's ``grad`` and finite differences.
"""

from fbp import (
    accounting,
    augment,
    check,
    cpu_memory,
    credit,
    curvature,
    data,
    debug,
    deviation,
    diagnostics,
    kfac,
    losses,
    nn,
    optim,
    per_example,
    privacy,
    telemetry,
    train,
    xla_cpu,
)
from fbp.core import InputError, Layer, Loss, grad, to_jax, vjp
from fbp.engine import value_and_grad
from fbp.nn.function import layer

xla_cpu.apply()  # convolutions on XLA's own CPU kernels (fbp/xla_cpu.py); before JAX creates a backend
cpu_memory.apply()  # freed host buffers stay in the heap: no page faults per call (fbp/cpu_memory.py)

__version__ = "0.1.0"

__all__ = ["InputError", "Layer", "Loss", "accounting", "augment", "check", "cpu_memory", "credit", "curvature",
           "data", "debug", "deviation", "diagnostics", "grad", "kfac", "layer", "losses", "nn", "optim", "per_example",
           "privacy", "telemetry", "to_jax", "train", "value_and_grad", "vjp", "xla_cpu", "__version__"]
