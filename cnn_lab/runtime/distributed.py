"""Joining a multi-process run: `jax.distributed.initialize`, explicit or detected from the scheduler.

Called by entry points before anything touches a JAX device. Explicit mode takes the
coordinator's address, the number of processes and this process's id (the local launcher,
hand-started hosts). Without them, JAX reads them from the environment of a multi-task
SLURM step (`srun`) or a Cloud TPU VM; anywhere else the run stays single-process.
"""

import contextlib
import glob
import importlib.util
import os
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

# Bytes of an error message that processes exchange when one of them cannot start.
_MESSAGE_BYTES = 2048


def detected_cluster() -> str | None:
    """ "slurm" inside a multi-task srun step, "tpu" on a Cloud TPU VM, else None."""
    # The variables JAX's SLURM detection reads; srun sets them for every task of a step.
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(v in os.environ for v in slurm) and int(os.environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    # A TPU VM has libtpu and its TPU chips as /dev/accel* (v2-v4) or /dev/vfio/<n> (v5+);
    # JAX asks the VM's metadata server for the workers, and one worker gives one process.
    tpu_chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    if tpu_chips and importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Connect this process to the others of its run, or do nothing for a single-process run.

    Give all three arguments (explicit mode) or none (detected). Raises ValueError for a
    partial or inconsistent set.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError(
                f"--coordinator_address={coordinator_address}, --num_processes={num_processes}, "
                f"--process_id={process_id}: a multi-process run needs all three (e.g. "
                "--coordinator_address=10.0.0.1:12345 --num_processes=2 --process_id=0), or "
                "none of them under SLURM (srun) or on a Cloud TPU VM."
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} is not in [0, --num_processes={num_processes}). "
                f"Number the processes 0 to {num_processes - 1}."
            )
        if num_processes == 1:
            return
        _use_cpu_collectives()
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif detected_cluster() is not None:
        _use_cpu_collectives()
        jax.distributed.initialize()


def _use_cpu_collectives() -> None:
    # CPU devices of different processes talk through gloo (XLA's CPU client has no other
    # cross-process collectives); GPU and TPU clients ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


@contextlib.contextmanager
def entered_everywhere(context: contextlib.AbstractContextManager) -> Iterator:
    """Enter `context` on every process of the run, or on none.

    A process whose entry raises re-raises its error; the others raise ValueError quoting it,
    at once, instead of waiting for it at their next collective until the timeout.
    """
    if jax.process_count() == 1:
        with context as value:
            yield value
        return
    with contextlib.ExitStack() as stack:
        try:
            value, error, message = stack.enter_context(context), None, b""
        except Exception as caught:  # Shared with the others, then raised here.
            value, error, message = None, caught, str(caught).encode()[:_MESSAGE_BYTES]
        mine = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
        mine[0], mine[1 : len(message) + 1] = error is not None, np.frombuffer(message, np.uint8)
        everyone = multihost_utils.process_allgather(mine)
        if error is not None:
            raise error
        for process, row in enumerate(everyone):
            if row[0]:
                text = row[1:].tobytes().rstrip(b"\0").decode(errors="replace")
                raise ValueError(f"Process {process} of this run could not start: {text}")
        yield value
