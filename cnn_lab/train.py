"""Train and evaluate a config; rerunning on a workdir resumes it.

usage: python -m cnn_lab.train --config=configs/<name>.py[:smoke] --workdir=<dir> [--config.<field>=<value> ...]
example: python -m cnn_lab.train --config=configs/lenet_digits.py --workdir=runs/lenet --config.train.num_epochs=5

Resume order: the newest checkpoint that restores and validates (damaged ones are moved aside);
with none, the weights of config.init_from (transfer learning), or else from scratch.
"""

# ruff: noqa: E402 (the SIGTERM handler below comes before the imports it covers)
import os
import signal
import sys

PREEMPTED_EXIT_CODE = 75  # Of a run stopped by SIGTERM: "temporary failure, run me again".
if __name__ == "__main__":  # A SIGTERM during the imports (seconds) stops a run not yet begun.
    # os._exit, as an exception raised here can land in a callback that swallows it.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(PREEMPTED_EXIT_CODE))

import datetime
import functools
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from cnn_lab import checkpoint, checkpoint_policy, command_line, optim, user_input
from cnn_lab import workdir as workdir_lib
from cnn_lab.checkpoint_policy import Preempted
from cnn_lab.data import sources
from cnn_lab.metric_writer import TrainWindow
from cnn_lab.run_setup import Run, setup
from cnn_lab.runtime import distributed, host, sharding
from cnn_lab.state import TrainState, out_of_patience, restart_optimizer


def _enter_phase(run: Run, state: TrainState, phase: optim.Phase) -> TrainState:
    """The state at the first step of `phase`: its optimizer starts afresh."""
    if run.is_lead and len(run.phases) > 1:
        frozen = f"frozen: {', '.join(phase.frozen)}" if phase.frozen else "nothing frozen"
        print(f"phase {phase.index + 1}/{len(run.phases)} from step {phase.start} ({frozen})")
    restart = jax.jit(
        functools.partial(restart_optimizer, tx=phase.tx),
        out_shardings=sharding.replicated(run.mesh),
        donate_argnums=0,
    )
    return restart(state)


def train_loop(run: Run, sigterm: threading.Event) -> dict:
    """Train `run.state` through the remaining epochs, then evaluate it on test.

    Returns {"val": the last validation metrics (if an epoch ran), "test": the test metrics}.
    Raises Preempted once `sigterm` is set (or a multi-host preemption is agreed): at the next
    step, after saving it; at once if set during set-up; after the test evaluation, unwritten.
    """
    config, spe, policy = run.config, run.steps_per_epoch, run.checkpoints
    state, step = run.state, int(run.state.step)
    first_step = step
    phase = optim.phase_at(run.phases, step)
    train_step = run.train_steps[phase.index]
    window = TrainWindow(run.writer, config.train.batch_size, spe, step, run.is_lead)
    results, patience = {}, config.train.early_stopping_patience
    stopped_early = out_of_patience(state, step // spe, patience)  # Rerun: straight to test.
    last_epoch = step // spe if stopped_early else config.train.num_epochs
    try:
        if policy.preempted(step, sigterm):
            raise Preempted(step, moment="set-up")
        for epoch in range(step // spe, last_epoch):
            epoch_start = time.perf_counter()
            batches = run.data.train_batches(epoch, first_step=step % spe)
            bar = tqdm(
                total=spe,
                initial=step % spe,
                leave=False,
                desc=f"epoch {epoch + 1}/{config.train.num_epochs}",
                disable=None if config.train.progress_bar and run.is_lead else True,
            )
            for batch in batches:
                state, metrics = train_step(state, batch)
                if step == first_step:  # Compiled: what compiling freed goes back to the system.
                    host.release_freed_memory()
                window.add(metrics)  # Waits for the step before: at most two in flight.
                step += 1
                bar.update()
                if optim.phase_at(run.phases, step) is not phase:  # Before anything is saved.
                    phase = optim.phase_at(run.phases, step)
                    state = _enter_phase(run, state, phase)
                    train_step = run.train_steps[phase.index]
                # Every save follows a window write: its non-finite check comes first.
                if step in policy.snapshot_steps:
                    window.write(step)
                    policy.save_snapshot(state, step)
                if step % config.train.log_every_steps == 0:
                    bar.set_postfix(loss=f"{window.write(step)['loss']:.4f}")
                if step % spe == 0:
                    break  # The epoch's end: validation, then its save (and preemption).
                if policy.preempted(step, sigterm):
                    window.write(step)
                    policy.save_latest(state, step)
                    raise Preempted(step)
                every = config.checkpoint.every_steps
                if every and step % every == 0:
                    window.write(step)
                    policy.save_latest(state, step)
            bar.close()
            state, results["val"] = _end_epoch(
                run, state, step, epoch, window.write(step), epoch_start, last_epoch
            )
            if _stops_early(run, state, epoch, patience):
                break
            if policy.preempted(step, sigterm):
                raise Preempted(step)
    finally:
        policy.close()  # Whatever stopped the loop, saves already started complete.

    results["test"] = _test(run, state, step, sigterm)
    return results


def _stops_early(run: Run, state: TrainState, epoch: int, patience: int) -> bool:
    """Whether validation has not improved for `patience` epochs after `epoch`; says so."""
    if not out_of_patience(state, epoch + 1, patience):
        return False
    if run.is_lead:
        print(
            f"Early stopping: no validation gain for {patience} epochs (best "
            f"{float(state.best_val_accuracy):.4f} at epoch {int(state.best_val_epoch)})."
        )
    return True


def _test(run: Run, state: TrainState, step: int, sigterm: threading.Event) -> dict:
    """The final state's test metrics, written and printed; Preempted if `sigterm` is set."""
    test = run.evaluate(state, step, "test")
    if sigterm.is_set():  # The rerun evaluates again: no test record twice.
        raise Preempted(step, moment="the test evaluation")
    run.writer.write(step=step, epoch=step / run.steps_per_epoch, split="test", metrics=test)
    if run.is_lead:
        run.writer.plot()
        print(
            f"test: loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f} "
            f"{run.evaluate.accuracies(test)}({test['count']} examples)"
        )
    return test


def _end_epoch(
    run: Run,
    state: TrainState,
    step: int,
    epoch: int,
    train: dict,
    epoch_start: float,
    last_epoch: int,
) -> tuple[TrainState, dict]:
    """Validate after `epoch`, record it in the state, save, and print the epoch's line.

    `train`: the epoch's last training window; returns the state and validation metrics.
    """
    config = run.config
    val = run.evaluate(state, step, "val")
    val.pop("per_class_accuracy")
    # Training and validation time of this epoch: a report sums them into run time.
    val["epoch_seconds"] = time.perf_counter() - epoch_start
    run.writer.write(step=step, epoch=step / run.steps_per_epoch, split="val", metrics=val)
    selected = config.averaging.select
    state = run.record_validation(
        state,
        jnp.float32(val["accuracy"]),
        jnp.float32(val["accuracy" if selected == "raw" else f"{selected}_accuracy"]),
        jnp.int32(epoch + 1),
    )
    run.checkpoints.save_epoch(state, step, best=int(state.best_val_epoch) == epoch + 1)
    if run.is_lead:
        seconds = time.perf_counter() - epoch_start
        left = datetime.timedelta(seconds=round(seconds * (last_epoch - epoch - 1)))
        print(
            f"epoch {epoch + 1}/{config.train.num_epochs}: train loss "
            f"{train['loss']:.4f} acc {train['accuracy']:.4f} | "
            f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} "
            f"{run.evaluate.accuracies(val)}| lr "
            f"{train['learning_rate']:.3g} | "
            f"{train['images_per_second']:.0f} img/s | {seconds:.1f}s, ETA {left}"
        )
        run.writer.plot()
    return state, val


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    allow_config_changes: tuple[str, ...] = (),
) -> dict:
    """Train `config` in `workdir` (resuming from its checkpoints), then evaluate on test.

    `allow_config_changes` names config fields that may differ from the run being resumed.
    Returns the final validation and test metrics. Raises Preempted after a SIGTERM save, and
    workdir.WorkdirBusy, before writing anything, while another run trains in `workdir`.
    """
    workdir = Path(workdir)
    with checkpoint_policy.sigterm_flag() as sigterm:
        # Before the lock creates the workdir: a mistake writes nothing.
        user_input.check_workdir(workdir)
        # Own data is decoded (beside it, or in the workdir if its folder is read-only) and
        # unset fields taken from it; its mistakes are raised before anything is written.
        config = sources.resolve(config, fallback_dir=workdir / "data_cache")
        user_input.validate(config, sharding.make_mesh())
        # Process 0 holds the workdir's lock for the whole run; the OS frees it if it dies.
        lock = workdir_lib.locked(workdir, enabled=jax.process_index() == 0)
        with distributed.entered_everywhere(lock):
            return train_loop(setup(config, workdir, allow_config_changes), sigterm)


def main() -> None:
    """Command line: --config=<file>[:mode] with --config.<field>=<value> overrides, --workdir.

    A mistake (a flag, a config value, the workdir) ends with one `error:` paragraph and exit
    status 1; CNN_LAB_VERBOSE=1 shows its traceback instead.
    """
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py).", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
    allow = flags.DEFINE_list(
        "allow_config_changes", [], "Config fields that may differ from the run being resumed."
    )
    coordinator = flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-process run: host:port of process 0 (none: detected under srun or on a TPU VM).",
    )
    num_processes = flags.DEFINE_integer("num_processes", None, "Multi-process run: processes.")
    process_id = flags.DEFINE_integer("process_id", None, "Multi-process run: this one's id.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: list[str]) -> None:
        del argv
        train_config = config.value.train
        micro_batch = train_config.batch_size // max(train_config.grad_accumulation_steps, 1)
        try:
            host.prepare(config.value, micro_batch)
            distributed.initialize(coordinator.value, num_processes.value, process_id.value)
            train_and_evaluate(config.value, workdir.value, allow_config_changes=tuple(allow.value))
        except Preempted as preempted:
            print(preempted, file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        except (
            ValueError,
            OSError,  # FileNotFoundError and the workdir's disk (permissions, space).
            FloatingPointError,
            checkpoint.CheckpointError,
        ) as error:
            command_line.report(error)  # The message says what to change; no traceback.

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
