"""Data-parallel training on ``jax.sharding``: the batch split over a mesh axis, parameters
and optimizer state replicated (or, for large leaves, sharded FSDP-style).

Nothing here is a collective of ours. The step is the same function as on one device, jitted
with its batch laid out ``PartitionSpec("data")`` and its parameters ``PartitionSpec()``; XLA's
SPMD partitioner (GSPMD) splits the forward and backward over the devices and inserts the
all-reduce that turns each device's partial weight gradient ``Σ_{b ∈ shard} x_bᵀ g_b`` into the
full ``Xᵀ G``. Everything that is a function of the whole batch stays one:

* BatchNorm's statistics are over the **global** batch, as on one device;
* dropout masks are drawn for the global batch shape from the same key (with JAX's
  partitionable threefry), so they do not depend on the device count;
* the loss's mean is over the global batch.

The mesh uses ``AxisType.Auto`` axes: in ``Explicit`` mode each weight-gradient contraction
over the sharded batch axis would need an ``out_sharding`` annotation; in Auto mode GSPMD
chooses it. The same code runs over several processes (``jax.distributed.initialize``; see
``examples/multiprocess_data_parallel.py``) — the mesh then spans every process's devices.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"


def data_mesh(num_devices: int | None = None, axis: str = DATA) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all, across processes).

    Args:
        num_devices: how many devices (default all, across processes).
        axis: the mesh axis' name.

    Returns:
        A ``jax.sharding.Mesh`` of shape ``(num_devices,)``.
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or not 1 <= num_devices <= len(devices):
        raise ValueError(f"data_mesh: num_devices must be an int in [1, {len(devices)}] (the devices JAX sees), "
                         f"got {num_devices!r}")
    return jax.make_mesh((num_devices,), (axis,), axis_types=(AxisType.Auto,), devices=devices[:num_devices])


def require_mesh(mesh: Any, caller: str = "fbp.parallel") -> Mesh:
    """Check ``mesh`` is a 1-D ``jax.sharding.Mesh``.

    Args:
        mesh: what was passed as the mesh.
        caller: the public function's name, for the message.

    Returns:
        ``mesh``.

    Raises:
        TypeError: anything else (an axis name such as ``"data"``, a device list, a 2-D mesh).
    """
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise TypeError(f"{caller}: mesh must be a 1-D jax.sharding.Mesh, made with fbp.parallel.data_mesh() (or "
                        f"data_mesh(num_devices)); got {type(mesh).__name__} {mesh!r}")
    return mesh


def _axis(mesh: Mesh) -> str:
    return require_mesh(mesh).axis_names[0]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the mesh; the other axes whole.

    Args:
        mesh: a mesh from ``data_mesh``.

    Returns:
        A ``NamedSharding`` splitting axis 0 over the mesh.
    """
    return NamedSharding(mesh, PartitionSpec(_axis(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array.

    Args:
        mesh: a mesh from ``data_mesh``.

    Returns:
        A ``NamedSharding`` with an empty partition spec.
    """
    return NamedSharding(mesh, PartitionSpec())


def require_divisible(batch: int, mesh: Mesh, what: str = "batch") -> None:
    """Check that a batch splits evenly over a mesh's devices.

    Args:
        batch: the number of examples.
        mesh: the device mesh.
        what: how the message names the batch.

    Raises:
        ValueError: ``batch`` is not a multiple of the number of devices.
    """
    devices = require_mesh(mesh).devices.size
    if batch % devices:
        raise ValueError(f"{what} of {batch} examples cannot be split evenly over the {devices} devices of the "
                         f"mesh; use a batch size that is a multiple of {devices}")


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = 2**18) -> Any:
    """Per leaf: split over the mesh along its largest axis the device count divides if it
    holds at least ``min_size`` elements (FSDP-style: each device stores a slice; XLA gathers
    it where the leaf is used), else replicated.

    Args:
        tree: a pytree of arrays (params, optimizer state).
        mesh: a mesh from ``data_mesh``.
        min_size: the smallest leaf (in elements) that is split (default 2¹⁸).

    Returns:
        A pytree of ``NamedSharding`` s shaped like ``tree``.
    """
    axis, devices = _axis(mesh), mesh.devices.size

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        if math.prod(shape) < min_size:
            return replicated(mesh)
        fits = [i for i, n in enumerate(shape) if n % devices == 0]
        if not fits:
            return replicated(mesh)
        i = max(fits, key=lambda j: shape[j])
        return NamedSharding(mesh, PartitionSpec(*([None] * i), axis))

    return jax.tree_util.tree_map(one, tree)


def place(tree: Any, sharding) -> Any:
    """``jax.device_put`` of a pytree onto a sharding (one for all leaves, or a matching tree);
    leaves already laid out so are not copied.

    Args:
        tree: a pytree of arrays.
        sharding: one sharding for every leaf, or a pytree of them shaped like ``tree``.

    Returns:
        The placed pytree.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)
    return jax.tree_util.tree_map(jax.device_put, tree, sharding)


def constrain_batch(tree: Any, mesh: Mesh) -> Any:
    """Inside a jitted function: lay the batch axis of every leaf out over the mesh.

    Args:
        tree: a pytree of arrays, batch first.
        mesh: the device mesh.

    Returns:
        ``tree`` with a sharding constraint on every leaf.
    """
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh))
