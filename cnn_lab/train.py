"""Train and evaluate a config: `python -m cnn_lab.train --config=configs/<name>.py --workdir=<dir>`.

Resume order: re-running on a workdir continues from its newest checkpoint that restores
and validates (damaged ones are moved aside); with none, training starts from the weights
of config.init_from (transfer learning), or else from scratch.
"""

# ruff: noqa: E402 (the SIGTERM handler below comes before the imports it covers)
import os
import signal
import sys

PREEMPTED_EXIT_CODE = 75  # Of a run stopped by SIGTERM: "temporary failure, run me again".
if __name__ == "__main__":  # A SIGTERM during the imports (seconds) stops a run not yet begun.
    # os._exit, as an exception raised here can land in a callback that swallows it.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(PREEMPTED_EXIT_CODE))

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from tqdm import tqdm

from cnn_lab import (
    averaging,
    checkpoint,
    checkpoint_policy,
    evaluation,
    loss_scaling,
    optim,
    steps,
    transfer,
    user_input,
)
from cnn_lab import state as train_state
from cnn_lab import workdir as workdir_lib
from cnn_lab.averaging import Averaging
from cnn_lab.checkpoint_policy import Preempted
from cnn_lab.data import augment, inputs
from cnn_lab.metric_writer import MetricWriter, TrainWindow
from cnn_lab.models import conv_implementation, get_model
from cnn_lab.runtime import distributed, host, provenance, sharding
from cnn_lab.state import TrainState, init_state, record_validation, restart_optimizer, start_from


@dataclasses.dataclass(frozen=True)
class Run:
    """A run as `setup` prepares it: what the loop trains, on what, and where it writes."""

    config: ml_collections.ConfigDict
    is_lead: bool  # Process 0: prints, writes metrics and the config.
    model: nn.Module
    mesh: Mesh
    data: inputs.Inputs
    steps_per_epoch: int
    phases: list[optim.Phase]  # Each with its optimizer and learning-rate schedule.
    train_steps: list[Callable]  # The jitted train step of each phase (compiled when reached).
    averaging: Averaging
    state: TrainState  # To start from (the loop donates it): resumed, transferred or fresh.
    checkpoints: checkpoint_policy.CheckpointPolicy
    writer: MetricWriter
    evaluate: evaluation.SideBySide
    record_validation: Callable  # state.record_validation, jitted.


def setup(
    config: ml_collections.ConfigDict,
    workdir: Path,
    allow_config_changes: tuple[str, ...] = (),
) -> Run:
    """Open `config`'s data and checkpoints, and restore (or create) the state.

    `config` and `workdir` come checked (`user_input.validate`, `check_workdir`); what else a
    user can get wrong (a changed config, the data set) is checked here before the workdir is
    written to: a mistake leaves it as it was.
    """
    is_lead = jax.process_index() == 0
    mesh = sharding.make_mesh()
    model = get_model(config.model)
    if (
        checkpoint.has_steps(workdir / checkpoint.LATEST_DIR)
        and (workdir / workdir_lib.CONFIG_FILE).exists()
    ):
        workdir_lib.check_resumable(workdir, config, allow_config_changes)
    data = inputs.make_inputs(
        config.data,
        config.train.batch_size,
        mesh,
        seed=config.seed,
        resized_crop=augment.crop_ranges(config.augment),
    )
    steps_per_epoch = data.steps_per_epoch
    total_steps = config.train.num_epochs * steps_per_epoch
    phases = optim.make_phases(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    averages = averaging.from_config(config.averaging, steps_per_epoch=steps_per_epoch)
    snapshot_steps = optim.cycle_ends(
        config.schedule, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    replicated = sharding.replicated(mesh)
    # A fresh state for a phase's optimizer (its state's layout changes with phases).
    fresh = functools.partial(
        init_state,
        model,
        plateau=optim.make_plateau(config.schedule),
        rng=jax.random.PRNGKey(config.seed),
        image_shape=image_shape,
        mesh=mesh,
        averaging=averages,
        loss_scale=loss_scaling.from_config(config.model.compute_dtype, config.train),
    )
    normalize = augment.normalizer(tuple(config.data.mean), tuple(config.data.std))
    train_steps = [
        steps.jit_train_step(
            model,
            phase.tx,
            phase.schedule,
            mesh,
            label_smoothing=config.train.label_smoothing,
            preprocess=augment.train_preprocess(config, crops_on_host=data.crops_on_host),
            averaging=averages,
            frozen_norms=phase.frozen if config.train.frozen_bn_inference else (),
            micro_batches=config.train.grad_accumulation_steps,
        )
        for phase in phases
    ]
    evaluate = evaluation.SideBySide.for_run(
        model, data, averages, normalize, config.eval, config.averaging, config.train.progress_bar
    )
    record = jax.jit(
        functools.partial(record_validation, feed_plateau=optim.plateau_feedback(config.schedule)),
        out_shardings=replicated,
        donate_argnums=0,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    latest = checkpoint.make_manager(workdir / checkpoint.LATEST_DIR, config.checkpoint.keep)
    policy = None
    try:
        # A checkpoint at step s holds the optimizer state of the phase that trains step s + 1.
        restored = checkpoint.restore_newest_valid(
            latest, lambda s: fresh(optim.phase_at(phases, s).tx, abstract=True)
        )
        # Resuming without config.json is refused here, after the restore: a checkpoint of
        # another model is then reported as such (check_resumable above needs the file).
        if restored is not None:
            workdir_lib.check_config_present(workdir, latest.all_steps())
        state = restored if restored is not None else fresh(phases[0].tx)
        if restored is None and config.init_from.workdir:
            variables = transfer.initial_variables(config.init_from, state.variables)
            state = jax.jit(
                functools.partial(start_from, tx=phases[0].tx, averaging=averages),
                out_shardings=replicated,
            )(state, variables)
        if restored is None:  # A fresh start: an earlier attempt's outputs must not mix in.
            checkpoint_policy.move_previous_attempt(workdir, latest)
        step = int(state.step)
        policy = checkpoint_policy.CheckpointPolicy(latest, workdir, snapshot_steps)

        writer = MetricWriter(workdir, enabled=is_lead, resume_step=step, config=config)
        if is_lead:
            implementation = conv_implementation(model)
            workdir_lib.write_config(workdir, config, provenance.collect(mesh, implementation))
            images, key = jnp.zeros((1, *image_shape)), jax.random.PRNGKey(0)
            print(model.tabulate(key, images, train=False, console_kwargs={"width": 120}))
            n_params = sum(x.size for x in jax.tree.leaves(state.params))
            start = f"starting from {config.init_from.workdir or 'scratch'}"
            start = start if restored is None else f"resuming at step {step}"
            print(
                f"{config.model.name}: {n_params:,} parameters; "
                + ", ".join(f"{data.num_examples(s)} {s}" for s in ("train", "val", "test"))
                + f" examples ({data.mode} input); {mesh.size} device(s); {start}"
            )
        if restored is not None:
            policy.catch_up(state, step, best_step=int(state.best_val_epoch) * steps_per_epoch)
    except BaseException:
        # Stop the managers' threads: a failed setup ends with its error, not their noise.
        (latest if policy is None else policy).close()
        raise
    return Run(
        config=config,
        is_lead=is_lead,
        model=model,
        mesh=mesh,
        data=data,
        steps_per_epoch=steps_per_epoch,
        phases=phases,
        train_steps=train_steps,
        averaging=averages,
        state=state,
        checkpoints=policy,
        writer=writer,
        evaluate=evaluate,
        record_validation=record,
    )


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
    phase = optim.phase_at(run.phases, step)
    train_step = run.train_steps[phase.index]
    window = TrainWindow(run.writer, config.train.batch_size, spe, step, run.is_lead)
    results = {}
    patience = config.train.early_stopping_patience
    stopped_early = train_state.out_of_patience(state, step // spe, patience)  # Rerun: to test.
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
                disable=not (config.train.progress_bar and run.is_lead),
            )
            for batch in batches:
                state, metrics = train_step(state, batch)
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
            train = window.write(step)

            val = run.evaluate(state, step, "val")
            val.pop("per_class_accuracy")
            run.writer.write(step=step, epoch=step / spe, split="val", metrics=val)
            selected = config.averaging.select
            state = run.record_validation(
                state,
                jnp.float32(val["accuracy"]),
                jnp.float32(val["accuracy" if selected == "raw" else f"{selected}_accuracy"]),
                jnp.int32(epoch + 1),
            )
            policy.save_epoch(state, step, best=int(state.best_val_epoch) == epoch + 1)
            if run.is_lead:
                print(
                    f"epoch {epoch + 1}/{config.train.num_epochs}: train loss "
                    f"{train['loss']:.4f} acc {train['accuracy']:.4f} | "
                    f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} "
                    f"{run.evaluate.accuracies(val)}| lr "
                    f"{train['learning_rate']:.3g} | "
                    f"{train['images_per_second']:.0f} img/s | "
                    f"{time.perf_counter() - epoch_start:.1f}s"
                )
                run.writer.plot()
            results["val"] = val
            if train_state.out_of_patience(state, epoch + 1, patience):
                if run.is_lead:
                    print(
                        f"Early stopping: no validation gain for {patience} epochs (best "
                        f"{float(state.best_val_accuracy):.4f} at epoch "
                        f"{int(state.best_val_epoch)})."
                    )
                break
            if policy.preempted(step, sigterm):
                raise Preempted(step)
    finally:
        policy.close()  # Whatever stopped the loop, saves already started complete.

    results["test"] = run.evaluate(state, step, "test")
    if sigterm.is_set():  # The rerun evaluates again: no test record twice.
        raise Preempted(step, moment="the test evaluation")
    run.writer.write(step=step, epoch=step / spe, split="test", metrics=results["test"])
    if run.is_lead:
        run.writer.plot()
        print(
            f"test: loss {results['test']['loss']:.4f}, accuracy "
            f"{results['test']['accuracy']:.4f} {run.evaluate.accuracies(results['test'])}"
            f"({results['test']['count']} examples)"
        )
    return results


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
    from absl import app, flags, logging
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
        if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every file they touch.
            logging.set_verbosity(logging.ERROR)
        train_config = config.value.train
        micro_batch = train_config.batch_size // max(train_config.grad_accumulation_steps, 1)
        multi_process = (num_processes.value or 1) > 1 or distributed.detected_cluster() is not None
        try:
            host.prepare(config.value, micro_batch, multi_process)
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
            user_input.report(error)  # The message says what to change; no traceback.

    app.run(run, flags_parser=user_input.parse_flags)


if __name__ == "__main__":
    main()
