"""Data parallelism: one mesh axis over every device of every host, batch split along it."""

import functools
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def use_cpu_devices(count: int, batch_size: int | None = None) -> None:
    """Split the CPU backend into `count` devices; call before JAX starts its backends.

    `count` 0 takes one device per core, or the most that `batch_size` splits over evenly.
    XLA's CPU convolutions and small ops keep about one core busy; with one device per core
    the data-sharded step runs its shards in parallel. Accelerator backends are unaffected.
    A device count already forced through XLA_FLAGS (tests, multi-process debugging) wins.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    if not count:
        count = len(os.sched_getaffinity(0))
        while batch_size and batch_size % count:
            count -= 1
    jax.config.update("jax_num_cpu_devices", count)


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def traced_over(mesh: Mesh, function: Callable) -> Callable:
    """`function`, traced with `mesh` as the abstract mesh: the CPU kernels then split their
    calls over the mesh's devices (`kernels.devices`) instead of gathering the batch."""

    @functools.wraps(function)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return function(*args, **kwargs)

    return traced


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str) -> None:
    """Fail early, and say what to change, when `batch_size` does not split over the devices."""
    if batch_size % mesh.size:
        raise ValueError(
            f"{what}={batch_size} does not split over {mesh.size} devices. Use a multiple of "
            f"{mesh.size}, e.g. {what}={max(mesh.size, batch_size // mesh.size * mesh.size)}."
        )


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch (sharded over the data axis) from this process's rows of it."""
    sharding = batch_sharded(mesh)
    if jax.process_count() == 1:  # This process's rows are the batch: half the cost per call.
        return jax.device_put(local_batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
