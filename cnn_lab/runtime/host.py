"""The process's set-up before JAX starts its backends: CPU devices and malloc.

Host memory: the process keeps what it frees mapped, so each step reuses the same pages.

XLA's CPU runtime allocates every step's temporary buffers afresh (hundreds of MB for a
ResNet-20 train step). glibc serves blocks that large with mmap and unmaps them when they
are freed, so every step the kernel faults in and zeroes every page again, a large share of
a CPU step's time (docs/cpu_kernels.md has the figures). With one malloc arena that
never maps blocks of its own and never trims its heap, the next step's buffers land on
memory that is already mapped. The cost: memory freed by the process is not given back to
the system until it exits (its peak stays resident), except where `release_freed_memory` is
called (after compiling).

XLA:CPU starts a step as soon as the step before has its outputs ready, before that step has
freed its temporaries, so with asynchronous dispatch two steps' temporaries are live at once;
in a heap that never shrinks, each overlap can leave another block of that size behind
(ResNet-20 at batch 128: 286 MB a step, 1.4 to 2 GB held). So with kept memory the CPU runs
each step when it is dispatched, and each step reuses the block the step before freed
(JAX_CPU_ENABLE_ASYNC_DISPATCH=true in the environment keeps asynchronous dispatch).
"""

import ctypes
import glob
import os

import jax
import ml_collections
from absl import logging

from cnn_lab import models
from cnn_lab.runtime import sharding

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Threads other than the main one get arenas of at most 64 MB, which map larger blocks with
# mmap whatever M_MMAP_MAX says: so every thread shares the main arena.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, and CPU steps run when dispatched;
    call before JAX starts its threads and backends.

    Returns whether it applied: False where the C library has no mallopt (macOS, musl).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    applied = mallopt is not None and all(mallopt(p, v) == 1 for p, v in _SETTINGS)
    if not applied:
        logging.warning("keep_freed_memory: this C library has no glibc mallopt; not applied.")
        return False
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:  # JAX's own switch, where set, wins.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def release_freed_memory() -> None:
    """Give the memory malloc holds free back to the system (glibc; elsewhere nothing).

    Call once a step is compiled: compiling frees hundreds of MB that kept memory would
    otherwise hold for the whole run; the steps then map only what they reuse.
    """
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def cpu_devices(requested: int, model_config: ml_collections.ConfigDict) -> int:
    """The CPU device count to split into: `requested`, else the count cnn_lab's CPU
    convolutions run best on where they will run (`kernels.selection.cpu_devices`), else 0
    (one per core).

    Call before JAX starts its backends: it looks only at the config and installed files,
    and builds nothing; a backend named other than CPU (JAX_PLATFORMS) never loads
    `cnn_lab.kernels`.
    """
    implementation = model_config.get("conv_implementation", "auto")
    platforms = jax.config.jax_platforms  # Read without starting a backend.
    if (
        requested
        or implementation == "xla"
        or not models.has_convolutions(model_config.get("name"))
        or (platforms and platforms.split(",")[0] != "cpu")
    ):
        return requested
    from cnn_lab.kernels import selection  # Only where the CPU may run the model.

    return selection.cpu_devices(implementation, model_config.get("compute_dtype", "float32"))


def prepare(config: ml_collections.ConfigDict, batch_size: int | None = None) -> None:
    """CPU devices (`config.train.cpu_devices`, see `cpu_devices`) and kept memory
    (`config.train.keep_freed_memory`) for a run of `config`; call before JAX starts.

    `batch_size` is the batch the devices split. A saved run's config must come through
    `workdir.read_config`, which fills in fields added since it was written.
    """
    sharding.use_cpu_devices(cpu_devices(config.train.cpu_devices, config.model), batch_size)
    if config.train.keep_freed_memory:
        keep_freed_memory()


def accelerator_warnings(compute_dtype: str) -> list[str]:
    """One line for each way a run on this machine would leave an accelerator idle, or ask the
    CPU for an accelerator's feature (`compute_dtype`: config.model.compute_dtype)."""
    if jax.default_backend() != "cpu":
        return []
    found = []
    for devices, extra, kind in (
        ("/dev/nvidia[0-9]*", "cuda12", "GPU"),
        ("/dev/accel*", "tpu", "TPU"),
    ):
        if visible := sorted(glob.glob(devices)):
            found.append(
                f"A {kind} is visible ({visible[0]}) but JAX runs on the CPU: this is JAX's CPU "
                f"build. Install the {kind} build with `pip install -e '.[{extra}]'`."
            )
    if compute_dtype != "float32":
        found.append(
            f"config.model.compute_dtype={compute_dtype!r} saves memory on GPUs and TPUs; on the "
            "CPU it runs slower than float32 (and without cnn_lab's CPU convolutions)."
        )
    return found
