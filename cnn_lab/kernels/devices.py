"""The kernels on several CPU devices: each device convolves its own shard of the batch.

XLA's SPMD partitioner cannot see into an FFI call: given a batch sharded over a mesh, it
would gather the whole batch onto every device and run the whole call on each. So every
kernel call goes through `batch_parallel`: inside a step traced over a mesh
(`jax.sharding.use_abstract_mesh`, as cnn_lab's steps are: `sharding.traced_over`), the call
runs in `jax.shard_map`, each device on its own rows with the other arguments (kernels,
biases) whole, and results that sum over the batch (kernel and bias gradients) are added up
over the devices (a psum). Outside a mesh, with a batch the devices cannot split evenly, or
inside `shard_map` already, the call runs as written. Under `jax.vmap` the call runs once per
member (`jax.custom_batching.sequential_vmap`). Unlike a custom partitioning rule, whose
callback's address is part of the compiled program, `shard_map` lowers to the same program in
every process, so the persistent compilation cache serves multi-device runs too.

The devices of a process share its cores: `threads_per_device` sizes each oneDNN call's
OpenMP team so that one call per device keeps every core busy without oversubscribing them.
(The batch-minor kernels run as tasks on XLA's intra-op thread pool, which the devices of a
process share already.)
"""

import math
import os
from collections.abc import Callable

import jax
from jax import lax
from jax.sharding import PartitionSpec

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

    def split(*arrays: jax.Array, static) -> tuple:
        mesh = jax.sharding.get_abstract_mesh()
        axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
        shards, batch = math.prod(mesh.shape[a] for a in axes), arrays[batch_argument].shape[0]
        if shards == 1 or batch % shards:
            axes, shards = (), 1  # Whole: XLA gathers an unevenly split batch.
        chosen = call if batch // shards % lanes == 0 else fallback
        if not axes:
            return chosen(*arrays, static)

        def per_shard(*arrays: jax.Array) -> tuple:
            found = chosen(*arrays, static)
            return tuple(lax.psum(r, axes) if s else r for r, s in zip(found, summed, strict=True))

        return jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=tuple(PartitionSpec(axes) if b else PartitionSpec() for b in batched),
            out_specs=tuple(PartitionSpec() if s else PartitionSpec(axes) for s in summed),
            check_vma=False,  # FFI calls declare no per-device variance.
        )(*arrays)

    def run(*arguments) -> tuple:
        *arrays, static = arguments
        return jax.custom_batching.sequential_vmap(lambda *a: split(*a, static=static))(*arrays)

    return run
