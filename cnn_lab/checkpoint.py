"""Orbax checkpoints of the TrainState in `<workdir>/checkpoints/<step>`."""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from cnn_lab.state import TrainState

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: Path, keep: int) -> ocp.CheckpointManager:
    """A manager keeping the latest `keep` steps; no `best_fn`, so the newest is never evicted."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def save(manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
    """Start saving `state` as `step` (asynchronously; the manager waits before the next save)."""
    manager.save(step, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, target: TrainState) -> TrainState | None:
    """The newest saved state, placed like `target` (shapes, dtypes, shardings); None if none."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
