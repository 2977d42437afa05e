"""When a training run saves what: latest, best and snapshot checkpoints, never a non-finite state.

The training loop says when a moment has come (a snapshot step, every_steps, an epoch's end,
preemption); this policy decides which managers save, in which order, and whether the state
may be saved at all. Directory layout and restore order: see cnn_lab/checkpoint.py.
"""

import contextlib
import datetime
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cnn_lab import checkpoint
from cnn_lab import workdir as workdir_lib
from cnn_lab.data import sources
from cnn_lab.state import TrainState

# What a training attempt, and the tools run on it, write into the workdir (glob patterns).
# A run starting from scratch moves these aside. Left in place: previous/, broken_checkpoints/
# (quarantined steps, each named by step and time, read by nothing and named in the error that
# preceded the fresh start) and files other programs keep there (launcher logs, the lock).
RUN_OUTPUTS = (
    checkpoint.LATEST_DIR,
    checkpoint.BEST_DIR,
    checkpoint.SNAPSHOT_DIR,
    workdir_lib.CONFIG_FILE,
    workdir_lib.CONFIG_FILE + ".tmp",
    sources.CLASSES_FILE,
    workdir_lib.METRICS_FILE,
    workdir_lib.METRICS_FILE + ".tmp",
    workdir_lib.TENSORBOARD_DIR,
    workdir_lib.CURVES_FILE,
    "eval_*.json",
    "ensemble_*.json",
    workdir_lib.PREDICTIONS_DIR,
    workdir_lib.INSPECT_DIR,
    workdir_lib.WANDB_DIR,
    workdir_lib.WANDB_RUN_FILE,
)


class Preempted(Exception):
    """SIGTERM (or a multi-host preemption notice) arrived; the run stopped with `step` saved.

    `moment` names what the signal interrupted when the run stopped without a save of its own
    (set-up, the final test evaluation); empty when it saved `step` on the way out.
    """

    def __init__(self, step: int, moment: str = ""):
        if not moment:
            message = f"Preempted: saved a checkpoint at step {step}; rerun to resume."
        elif step == 0:
            message = f"Preempted during {moment}, before any training step; rerun to start."
        else:
            message = (
                f"Preempted during {moment}; the checkpoint of step {step} holds the run, "
                "rerun to continue from it."
            )
        super().__init__(message)
        self.step = step


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
    """An Event set by SIGTERM while the block runs (signals only reach the main thread)."""
    flag = threading.Event()
    # Multi-host runs leave SIGTERM to JAX's preemption notifier (read through Orbax).
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


class CheckpointPolicy:
    """The run's checkpoint managers and the rules for saving into them.

    Callers write their pending train metrics first (their non-finite check comes before any
    save); a state with non-finite weights, statistics or moments is never saved.
    """

    def __init__(self, latest: ocp.CheckpointManager, workdir: Path, snapshot_steps: list[int]):
        """`latest` already opened (resume reads it); best/ and, with snapshot_steps, snapshots/."""
        self.latest = latest
        self.best = checkpoint.make_manager(workdir / checkpoint.BEST_DIR, 1)
        self.snapshot_steps = snapshot_steps  # The ends of the learning-rate cycles ([]: none).
        self.snapshots = (  # Keeps every snapshot.
            checkpoint.make_manager(workdir / checkpoint.SNAPSHOT_DIR) if snapshot_steps else None
        )

    def catch_up(self, state: TrainState, step: int, best_step: int) -> None:
        """After resuming at `step`: save the best or snapshot step a kill left unsaved.

        `best_step` is the step of the best validation so far. A kill between an epoch's
        latest and best saves leaves best/ behind; one after a snapshot step's latest save,
        snapshots/ (a snapshot is never re-taken).
        """
        if best_step == step and self.best.latest_step() != step:
            checkpoint.save(self.best, state, step)
        if step in self.snapshot_steps and step not in self.snapshots.all_steps():
            checkpoint.save(self.snapshots, state, step)

    def save_snapshot(self, state: TrainState, step: int) -> None:
        """Save the end of a learning-rate cycle, and wait until it is written."""
        self._save(self.snapshots, state, step)
        # Written before any later save can land: a kill then cannot leave a newer latest/
        # step behind a missing snapshot (it is never re-taken).
        self.snapshots.wait_until_finished()

    def save_latest(self, state: TrainState, step: int) -> None:
        """Save `state` as the newest step to resume from."""
        self._save(self.latest, state, step)

    def save_epoch(self, state: TrainState, step: int, *, best: bool) -> None:
        """An epoch's end: save latest, then (when validation improved) best."""
        self._save(self.latest, state, step)
        if best:
            self._save(self.best, state, step)

    def preempted(self, step: int, sigterm: threading.Event) -> bool:
        """Whether to save and stop at `step`: SIGTERM on one host; across hosts, Orbax's
        agreement (JAX's preemption notifier), so that every process stops at the same step."""
        if jax.process_count() > 1:
            return self.latest.reached_preemption(step)
        return sigterm.is_set()

    def close(self) -> None:
        """Let saves already started (of good states) complete, then close every manager."""
        for manager in (self.latest, self.best, self.snapshots):
            if manager is not None:
                manager.wait_until_finished()
                manager.close()

    def _save(self, manager: ocp.CheckpointManager, state: TrainState, step: int) -> None:
        damage = checkpoint.nonfinite(state)
        if damage:
            raise FloatingPointError(
                f"Non-finite state at step {step} ({'; '.join(damage[:5])}); not saved, training "
                "stopped, earlier checkpoints kept. Lower config.optimizer.learning_rate or set "
                "config.optimizer.grad_clip_norm."
            )
        checkpoint.save(manager, state, step)


def _dated_folder(parent: Path) -> Path:
    """A new folder in `parent` named by the UTC time (with a suffix if that name is taken)."""
    name = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder, n = parent / name, 1
    while folder.exists():
        folder, n = parent / f"{name}-{n}", n + 1
    folder.mkdir(parents=True)
    return folder


def _earlier_outputs(workdir: Path) -> list[Path]:
    """The RUN_OUTPUTS present in `workdir`; checkpoints/ counts only when it holds anything."""
    found = sorted({p for pattern in RUN_OUTPUTS for p in workdir.glob(pattern)})
    latest = workdir / checkpoint.LATEST_DIR
    return [p for p in found if p != latest or any(latest.iterdir())]


def move_previous_attempt(workdir: Path, latest: ocp.CheckpointManager) -> Path | None:
    """For a run starting from scratch: move every earlier output in `workdir` into one new
    folder previous/<UTC time>/, so that nothing this run did not write can pass for its own.

    Returns that folder (None if there was nothing to move). `latest`, the run's manager open
    on checkpoints/ (which holds no step at a fresh start), keeps its directory: only its
    contents move, then it reloads. Process 0 moves the files; every process must call this.
    """
    workdir = Path(workdir)
    moved_to = None
    if jax.process_index() == 0:
        earlier = _earlier_outputs(workdir)
        if earlier:
            moved_to = _dated_folder(workdir / workdir_lib.PREVIOUS_DIR)
            for path in earlier:
                if path.name == checkpoint.LATEST_DIR:
                    (moved_to / path.name).mkdir()
                    for entry in path.iterdir():
                        shutil.move(str(entry), str(moved_to / path.name / entry.name))
                else:
                    shutil.move(str(path), str(moved_to / path.name))
            print(
                f"Starting from scratch: moved the earlier outputs in {workdir} "
                f"({', '.join(p.name for p in earlier)}) to {moved_to}."
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cnn_lab_move_previous_attempt")
    latest.reload()
    return moved_to
