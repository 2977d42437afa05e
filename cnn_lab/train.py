"""Train and evaluate a config: `python -m cnn_lab.train --config=configs/<name>.py --workdir=<dir>`.

Resume order: re-running on a workdir continues from its newest checkpoint that restores
and validates (damaged ones are moved aside); with none, training starts from the weights
of config.init_from (transfer learning), or else from scratch.
"""

import contextlib
import functools
import itertools
import math
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from cnn_lab import averaging, checkpoint, optim, steps, transfer
from cnn_lab import workdir as workdir_lib
from cnn_lab.data import augment, inputs, loading
from cnn_lab.evaluation import evaluate, recompute_batch_stats
from cnn_lab.metric_writer import MetricWriter
from cnn_lab.models import conv_implementation, get_model
from cnn_lab.runtime import distributed, host, provenance, sharding
from cnn_lab.state import TrainState, init_state, restart_optimizer, start_from

# Exit code of a run stopped by SIGTERM after saving: "temporary failure, run me again".
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """SIGTERM (or a multi-host preemption notice) arrived; the state was saved at `step`."""

    def __init__(self, step: int):
        super().__init__(f"Preempted: saved a checkpoint at step {step}; rerun to resume.")
        self.step = step


def _check_classes(data_config: ml_collections.ConfigDict, num_classes: int) -> None:
    found = len(data_config.classes) or loading.num_classes(
        data_config.name, data_dir=data_config.data_dir, source_dir=data_config.source_dir
    )
    if found != num_classes:
        kept = f" (config.data.classes={tuple(data_config.classes)})" if data_config.classes else ""
        raise ValueError(
            f"Data set {data_config.name!r} has {found} classes{kept} but config.model.num_classes="
            f"{num_classes}. Set --config.model.num_classes={found}."
        )


def record_validation(
    state: TrainState,
    raw_accuracy: jax.Array,
    accuracy: jax.Array,
    epoch: jax.Array,
    *,
    plateau: optax.GradientTransformation | None,
) -> TrainState:
    """Track the best validation `accuracy` (of config.averaging.select's model).

    With a `plateau` schedule, feed it `raw_accuracy`: the rate steers the raw model.
    """
    plateau_state = state.plateau
    if plateau is not None:  # Other schedules must not be cut when validation stalls.
        _, plateau_state = plateau.update({}, state.plateau, value=1.0 - raw_accuracy)
    improved = accuracy > state.best_val_accuracy
    return state.replace(
        plateau=plateau_state,
        best_val_accuracy=jnp.where(improved, accuracy, state.best_val_accuracy),
        best_val_epoch=jnp.where(improved, epoch, state.best_val_epoch),
    )


def _mean_metrics(pending: list[dict], first_step: int) -> dict[str, float]:
    """Average a window of step metrics; halt on the first non-finite loss or gradient."""
    stacked = jax.device_get(pending)
    for offset, metrics in enumerate(stacked):
        if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
            raise FloatingPointError(
                f"Non-finite loss or gradient at step {first_step + offset + 1} "
                f"(loss={metrics['loss']}, grad_norm={metrics['grad_norm']}). Training stopped; "
                "checkpoints saved before this step are kept. Lower "
                "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
            )
    return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


@contextlib.contextmanager
def _sigterm_flag():
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


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    allow_config_changes: tuple[str, ...] = (),
) -> dict:
    """Train `config` in `workdir` (resuming from its checkpoints), then evaluate on test.

    `allow_config_changes` names config fields that may differ from the run being resumed.
    Returns the final validation and test metrics. Raises Preempted after a SIGTERM save.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_lead = jax.process_index() == 0
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    micro_batches = config.train.grad_accumulation_steps
    if micro_batches < 1 or config.train.batch_size % micro_batches:
        raise ValueError(
            f"config.train.grad_accumulation_steps={micro_batches} must be at least 1 and "
            f"divide config.train.batch_size={config.train.batch_size} (each micro-batch "
            "holds batch_size / grad_accumulation_steps examples)."
        )
    sharding.check_batch_size(
        config.train.batch_size // micro_batches,
        mesh,
        "config.train.batch_size / config.train.grad_accumulation_steps",
    )
    model = get_model(config.model)
    if config.augment.flip and not config.data.flip_preserves_label:
        raise ValueError(
            f"config.augment.flip=True, but a mirrored {config.data.name} image can change its "
            "label (config.data.flip_preserves_label=False). Set --config.augment.flip=False."
        )

    latest = checkpoint.make_manager(workdir / checkpoint.LATEST_DIR, config.checkpoint.keep)
    if latest.all_steps() and (workdir / workdir_lib.CONFIG_FILE).exists():
        workdir_lib.check_resumable(workdir, config, allow_config_changes)

    _check_classes(config.data, config.model.num_classes)
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
    plateau = optim.make_plateau(config.schedule)
    averages = averaging.from_config(config.averaging, steps_per_epoch=steps_per_epoch)
    snapshot_steps = optim.cycle_ends(
        config.schedule, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    replicated = sharding.replicated(mesh)

    def init(phase: optim.Phase, abstract: bool = False) -> TrainState:
        """A fresh state whose optimizer state is `phase`'s (its layout changes with phases)."""
        return init_state(
            model,
            phase.tx,
            plateau,
            jax.random.PRNGKey(config.seed),
            image_shape,
            mesh,
            averaging=averages,
            abstract=abstract,
        )

    # A checkpoint at step s holds the optimizer state of the phase that trains step s + 1.
    restored = checkpoint.restore_newest_valid(
        latest, lambda s: init(optim.phase_at(phases, s), abstract=True)
    )
    state = restored if restored is not None else init(phases[0])
    if restored is None and config.init_from.workdir:
        variables = transfer.initial_variables(config.init_from, state.variables)
        state = jax.jit(
            functools.partial(start_from, tx=phases[0].tx, averaging=averages),
            out_shardings=replicated,
        )(state, variables)
    step = int(state.step)
    best = checkpoint.make_manager(workdir / checkpoint.BEST_DIR, 1)
    managers = [latest, best]
    if snapshot_steps:  # Keeps every snapshot.
        snapshots = checkpoint.make_manager(workdir / checkpoint.SNAPSHOT_DIR)
        managers.append(snapshots)

    writer = MetricWriter(workdir, enabled=is_lead, resume_step=step)
    if is_lead:
        implementation = conv_implementation(model)
        workdir_lib.write_config(workdir, config, provenance.collect(mesh, implementation))
        print(
            model.tabulate(
                jax.random.PRNGKey(0),
                jnp.zeros((1, *image_shape)),
                train=False,
                console_kwargs={"width": 120},
            )
        )
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        print(
            f"{config.model.name}: {n_params:,} parameters; "
            + ", ".join(f"{data.num_examples(s)} {s}" for s in ("train", "val", "test"))
            + f" examples ({data.mode} input); {mesh.size} device(s); "
            + (
                f"resuming at step {step}"
                if restored
                else f"starting from {config.init_from.workdir}"
                if config.init_from.workdir
                else "from scratch"
            )
        )

    normalize = augment.normalizer(tuple(config.data.mean), tuple(config.data.std))

    @functools.cache
    def phase_step(index: int):
        """The jitted train step of phase `index`, compiled when the phase is first reached."""
        phase = phases[index]
        return steps.jit_train_step(
            model,
            phase.tx,
            phase.schedule,
            mesh,
            label_smoothing=config.train.label_smoothing,
            preprocess=augment.train_preprocess(config, crops_on_host=data.crops_on_host),
            averaging=averages,
            frozen_norms=phase.frozen if config.train.frozen_bn_inference else (),
            micro_batches=micro_batches,
        )

    def enter_phase(state: TrainState, phase: optim.Phase) -> TrainState:
        """The state at the first step of `phase`: its optimizer starts afresh."""
        if is_lead and len(phases) > 1:
            frozen = f"frozen: {', '.join(phase.frozen)}" if phase.frozen else "nothing frozen"
            print(f"phase {phase.index + 1}/{len(phases)} from step {phase.start} ({frozen})")
        restart = jax.jit(
            functools.partial(restart_optimizer, tx=phase.tx),
            out_shardings=replicated,
            donate_argnums=0,
        )
        return restart(state)

    phase = optim.phase_at(phases, step)
    train_step = phase_step(phase.index)
    read_averages = jax.jit(averages.read, out_shardings=sharding.replicated(mesh))
    eval_fn = steps.make_eval_fn(model, mesh, normalize)
    validation_update = jax.jit(
        functools.partial(
            record_validation, plateau=plateau if config.schedule.name == "plateau" else None
        ),
        out_shardings=sharding.replicated(mesh),
        donate_argnums=0,
    )

    def models() -> dict[str, dict]:
        """The variables evaluated side by side: the raw model's, then each average's."""
        variants = {"raw": state.variables}
        for name, variables in read_averages(state.averages, state.step).items():
            if config.averaging.batch_stats == "recompute":
                batches = data.train_batches(epoch=step // steps_per_epoch)
                batches = itertools.islice(batches, config.averaging.recompute_batches)
                variables = recompute_batch_stats(model, variables, batches, mesh, normalize)
            variants[name] = variables
        return variants

    def run_eval(split: str) -> dict:
        """Metrics of the raw model, and "<average>_loss" etc. of each average."""
        results = {}
        for name, variables in models().items():
            metrics = evaluate(
                eval_fn,
                variables,
                data.eval_batches(split, config.eval.batch_size),
                mesh,
                total=math.ceil((data.num_examples(split) or 0) / config.eval.batch_size) or None,
                progress=config.train.progress_bar,
                desc=f"{split} ({name})",
            )
            if name != "raw":
                keep = ("loss", "accuracy", "top5_accuracy")
                metrics = {f"{name}_{k}": v for k, v in metrics.items() if k in keep}
            results |= metrics
        return results

    def accuracies(metrics: dict) -> str:
        """ "ema 0.9911 polyak 0.9900 " for the averages kept ("" for none)."""
        return "".join(f"{name} {metrics[f'{name}_accuracy']:.4f} " for name in averages.names)

    pending, window_start, window_step = [], time.perf_counter(), step
    train_metrics: dict = {}

    def flush() -> None:
        """Write the pending window of train metrics (and stop on non-finite ones)."""
        nonlocal pending, window_start, window_step, train_metrics
        if not pending:
            return
        train_metrics = _mean_metrics(pending, window_step)
        train_metrics["images_per_second"] = (
            len(pending) * config.train.batch_size / (time.perf_counter() - window_start)
        )
        writer.write(step=step, epoch=step / steps_per_epoch, split="train", metrics=train_metrics)
        # ODE blocks (models/ode.py) report solves that stopped at max_steps short of t1.
        if is_lead and train_metrics.get("ode_max_steps_reached", 0.0) > 0:
            print(
                f"Warning: steps {window_step + 1}-{step}: an ODE solve reached max_steps before"
                " t1; raise config.model.max_steps or loosen config.model.rtol/atol."
            )
        pending, window_start, window_step = [], time.perf_counter(), step

    def save(manager) -> None:
        flush()  # Checks the steps since the last check are finite before anything is saved.
        damage = checkpoint.nonfinite(state)
        if damage:
            raise FloatingPointError(
                f"Non-finite state at step {step} ({'; '.join(damage[:5])}); not saved, training "
                "stopped, earlier checkpoints kept. Lower config.optimizer.learning_rate or set "
                "config.optimizer.grad_clip_norm."
            )
        checkpoint.save(manager, state, step)

    def preempted(at_step: int) -> bool:
        if jax.process_count() > 1:  # Orbax agrees on preemption across hosts.
            return latest.reached_preemption(at_step)
        return sigterm.is_set()

    # A kill between the latest and the best save of an epoch leaves best/ behind: catch up.
    best_step = int(state.best_val_epoch) * steps_per_epoch
    if restored is not None and best_step == step and best.latest_step() != step:
        checkpoint.save(best, state, step)
    if restored is not None and step in snapshot_steps and step not in snapshots.all_steps():
        checkpoint.save(snapshots, state, step)

    results = {}
    patience = config.train.early_stopping_patience
    stopped_early = (  # A rerun of a run that stopped early goes straight to the test.
        patience is not None and step // steps_per_epoch - int(state.best_val_epoch) >= patience
    )
    last_epoch = step // steps_per_epoch if stopped_early else config.train.num_epochs
    try:
        with _sigterm_flag() as sigterm:
            for epoch in range(step // steps_per_epoch, last_epoch):
                epoch_start = time.perf_counter()
                batches = data.train_batches(epoch, first_step=step % steps_per_epoch)
                bar = tqdm(
                    total=steps_per_epoch,
                    initial=step % steps_per_epoch,
                    leave=False,
                    desc=f"epoch {epoch + 1}/{config.train.num_epochs}",
                    disable=not (config.train.progress_bar and is_lead),
                )
                for batch in batches:
                    state, metrics = train_step(state, batch)
                    if pending:
                        # At most two steps in flight: the host prepares the next batch while
                        # the devices compute, and XLA never has a long queue of steps whose
                        # cross-device collectives could interleave (seen to deadlock with
                        # 8 CPU devices on 2 cores).
                        jax.block_until_ready(pending[-1])
                    pending.append(metrics)
                    step += 1
                    bar.update()
                    if optim.phase_at(phases, step) is not phase:  # Before anything is saved.
                        phase = optim.phase_at(phases, step)
                        state = enter_phase(state, phase)
                        train_step = phase_step(phase.index)
                    if step in snapshot_steps:
                        save(snapshots)
                        # Written before any later save can land: a kill then cannot leave a
                        # newer latest/ step behind a missing snapshot (it is never re-taken).
                        snapshots.wait_until_finished()
                    if step % config.train.log_every_steps == 0:
                        flush()
                        bar.set_postfix(loss=f"{train_metrics['loss']:.4f}")
                    if step % steps_per_epoch == 0:
                        break  # The epoch's end: validation, then its save (and preemption).
                    if preempted(step):
                        save(latest)
                        raise Preempted(step)
                    every = config.checkpoint.every_steps
                    if every and step % every == 0:
                        save(latest)
                bar.close()
                flush()

                val = run_eval("val")
                val.pop("per_class_accuracy")
                writer.write(step=step, epoch=step / steps_per_epoch, split="val", metrics=val)
                selected = config.averaging.select
                state = validation_update(
                    state,
                    jnp.float32(val["accuracy"]),
                    jnp.float32(val["accuracy" if selected == "raw" else f"{selected}_accuracy"]),
                    jnp.int32(epoch + 1),
                )
                save(latest)
                if int(state.best_val_epoch) == epoch + 1:
                    save(best)
                if is_lead:
                    print(
                        f"epoch {epoch + 1}/{config.train.num_epochs}: train loss "
                        f"{train_metrics['loss']:.4f} acc {train_metrics['accuracy']:.4f} | "
                        f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} "
                        f"{accuracies(val)}| lr "
                        f"{train_metrics['learning_rate']:.3g} | "
                        f"{train_metrics['images_per_second']:.0f} img/s | "
                        f"{time.perf_counter() - epoch_start:.1f}s"
                    )
                    writer.plot()
                results["val"] = val
                if patience is not None and epoch + 1 - int(state.best_val_epoch) >= patience:
                    if is_lead:
                        print(
                            f"Early stopping: no validation gain for {patience} epochs (best "
                            f"{float(state.best_val_accuracy):.4f} at epoch "
                            f"{int(state.best_val_epoch)})."
                        )
                    break
                if preempted(step):
                    raise Preempted(step)
    finally:
        # Whatever stopped the loop, let saves already started (of good states) complete.
        for manager in managers:
            manager.wait_until_finished()
            manager.close()

    results["test"] = run_eval("test")
    writer.write(step=step, epoch=step / steps_per_epoch, split="test", metrics=results["test"])
    if is_lead:
        writer.plot()
        print(
            f"test: loss {results['test']['loss']:.4f}, accuracy "
            f"{results['test']['accuracy']:.4f} {accuracies(results['test'])}"
            f"({results['test']['count']} examples)"
        )
    return results


def main() -> None:
    """Command line: --config=<file>[:mode] with --config.<field>=<value> overrides, --workdir."""
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
        logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log every file they touch.
        train_config = config.value.train
        micro_batch = train_config.batch_size // max(train_config.grad_accumulation_steps, 1)
        multi_process = (num_processes.value or 1) > 1 or distributed.detected_cluster() is not None
        host.prepare(config.value, micro_batch, multi_process)
        try:
            distributed.initialize(coordinator.value, num_processes.value, process_id.value)
            train_and_evaluate(config.value, workdir.value, allow_config_changes=tuple(allow.value))
        except Preempted as preempted:
            print(preempted, file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        except (
            ValueError,
            FileNotFoundError,
            FloatingPointError,
            checkpoint.CheckpointError,
        ) as error:
            sys.exit(f"error: {error}")  # The message says what to change; no traceback.

    app.run(run)


if __name__ == "__main__":
    main()
