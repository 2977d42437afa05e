"""The kernels on several CPU devices: each device convolves its own shard of the batch.

XLA's SPMD partitioner cannot see into an FFI call: given a batch sharded over a mesh, it
would gather the whole batch onto every device and run the whole call on each. So every
kernel call goes through `batch_parallel` (`jax.experimental.custom_partitioning`): where
its batch arguments arrive sharded along the batch, each device runs the call on its own
rows, with the other arguments (kernels, biases) whole, and results that sum over the batch
(kernel and bias gradients) are added up over the devices (a psum). On one device, outside
a mesh, or inside `shard_map`, the call runs as written. Under `jax.vmap` the call runs once
per member (`jax.custom_batching.sequential_vmap`).

The devices of a process share its cores: `threads_per_device` sizes each oneDNN call's
OpenMP team so that one call per device keeps every core busy without oversubscribing them.
(The batch-minor kernels run as tasks on XLA's intra-op thread pool, which the devices of a
process share already.)
"""

import math
import os
from collections.abc import Callable

import jax
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "b"  # The batch's factor in a `batch_parallel` rule.


def threads_per_device() -> int:
    """OpenMP threads for each oneDNN call: 0 (OpenMP's default, every core) where the process
    has one CPU device, else its cores shared evenly among its CPU devices (at least 1).

    The cores are OMP_NUM_THREADS where set, else those this process may run on.
    """
    devices = len(jax.local_devices(backend="cpu"))
    if devices == 1:
        return 0
    requested = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    cores = int(requested) if requested.isdigit() else len(os.sched_getaffinity(0))
    return max(1, cores // devices)


def batch_parallel(
    call: Callable, rule: str, lanes: int = 1, fallback: Callable | None = None
) -> Callable:
    """`call(*arrays, static) -> tuple of arrays`, run by each device on its batch shard.

    Args:
      call: an FFI call; `static` is a hashable value (the geometry) passed on unchanged.
      rule: each array's dimensions, Einsum-like ("b h w c, i j c o -> b p q o"): `b`, the
        batch, leads the batched arguments and results; a result without it is a sum over
        the batch. No other dimension is ever split.
      lanes: a shard whose batch is not a multiple of `lanes` runs `fallback` (same
        signature) instead of `call`.

    Returns:
      A function of the same signature as `call`.
    """
    operands, results = (side.split(",") for side in rule.split("->"))
    batched = tuple(operand.split()[0] == BATCH for operand in operands)
    summed = tuple(BATCH not in result.split() for result in results)
    batch_argument = batched.index(True)

    def shardings(mesh: Mesh, arg_shapes: tuple) -> tuple:
        """(mesh, batch axes, argument shardings, result shardings) for the arguments'."""
        sharding = arg_shapes[batch_argument].sharding
        if not isinstance(sharding, NamedSharding):  # No mesh: take every argument whole.
            devices = sorted(sharding.device_set, key=lambda device: device.id)
            mesh = Mesh(np.asarray(devices), ("devices",))
        axes = _batch_axes(sharding)
        if arg_shapes[batch_argument].shape[0] % math.prod(mesh.shape[a] for a in axes):
            axes = ()  # An uneven split: XLA gathers the batch.
        split = NamedSharding(mesh, PartitionSpec(axes or None))
        whole = NamedSharding(mesh, PartitionSpec())
        arguments = tuple(split if b else whole for b in batched)
        return mesh, axes, arguments, tuple(whole if s else split for s in summed)

    def infer_sharding_from_operands(static, mesh: Mesh, arg_shapes: tuple, result_shape) -> tuple:
        return shardings(mesh, arg_shapes)[3]

    def partition(static, mesh: Mesh, arg_shapes: tuple, result_shape) -> tuple:
        mesh, axes, arguments, outputs = shardings(mesh, arg_shapes)
        shards = math.prod(mesh.shape[a] for a in axes)
        local_batch = arg_shapes[batch_argument].shape[0] // shards
        chosen = call if local_batch % lanes == 0 else fallback

        def per_shard(*arrays: jax.Array) -> tuple:
            found = chosen(*arrays, static)
            return tuple(
                lax.psum(r, axes) if s and axes else r for r, s in zip(found, summed, strict=True)
            )

        return mesh, per_shard, outputs, arguments

    partitioned = custom_partitioning(call, static_argnums=(len(batched),))
    # Every dimension but the batch, in order of appearance (as Shardy numbers them).
    factors = dict.fromkeys(rule.replace("->", " ").replace(",", " ").split())
    factors.pop(BATCH)
    partitioned.def_partition(
        partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        propagate_user_sharding=None,
        sharding_rule=rule,
        reduction_factors=(BATCH,) if all(summed) else (),
        need_replication_factors=tuple(factors),
    )

    def run(*arguments) -> tuple:
        *arrays, static = arguments
        return jax.custom_batching.sequential_vmap(lambda *a: partitioned(*a, static))(*arrays)

    return run


def _batch_axes(sharding: jax.sharding.Sharding) -> tuple[str, ...]:
    """The mesh axes that split an array's leading axis under `sharding`."""
    spec = sharding.spec if isinstance(sharding, NamedSharding) else ()
    axes = spec[0] if spec else None
    if axes is None or axes is PartitionSpec.UNCONSTRAINED:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)
