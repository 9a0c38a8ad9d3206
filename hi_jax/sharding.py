"""Device meshes for the batch axes of estimators and training steps.

One program runs on one CPU, one GPU, or a slice of accelerators: batch
axes (outer samples, continuations, responses) are sharded over a
one-dimensional `jax.sharding.Mesh` named "batch", and XLA partitions the
vmapped computation. Results do not depend on the number of devices,
up to float32 rounding (about 1e-6 relative, since partial sums are
added in another order), because every random draw comes from keys split
before sharding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def batch_mesh(devices=None) -> Mesh:
    """Build a one-axis mesh named "batch" over `devices` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("batch_mesh needs at least one device; got an empty list")
    return Mesh(np.array(devices), (BATCH_AXIS,))


def _check_divisible(mesh: Mesh, size: int, field_name: str) -> None:
    count = mesh.shape[BATCH_AXIS]
    if size % count:
        raise ValueError(f"{field_name}={size} must be divisible by the {count} devices of "
                         "the mesh; change the sample counts or use fewer devices")


def unit_sharding(mesh: Mesh, num_sequences: int, num_groups: int) -> NamedSharding:
    """Sharding of [chunks, groups, n] keys: each group's n outer samples split over devices.

    Raises:
      ValueError: if n = num_sequences / num_groups is not divisible by the
        number of devices.
    """
    per_group, count = num_sequences // num_groups, mesh.shape[BATCH_AXIS]
    if per_group % count:
        raise ValueError(
            f"num_sequences / num_groups = {num_sequences} / {num_groups} = {per_group} "
            f"outer samples per group must be divisible by the {count} devices of the "
            "mesh; change num_sequences or num_groups, or pass mesh=None")
    return NamedSharding(mesh, PartitionSpec(None, None, BATCH_AXIS))


def batch_sharding(mesh: Mesh, batch_size: int, field_name: str = "batch_size") -> NamedSharding:
    """Sharding of an array whose leading axis is a batch of `batch_size`."""
    _check_divisible(mesh, batch_size, field_name)
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (parameters, for example)."""
    return NamedSharding(mesh, PartitionSpec())
