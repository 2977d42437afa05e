"""A training run assembled from its config: data, model, train steps, checkpoints and state.

`setup` does everything that can fail before training (a changed config, the data, the
restore) before it writes to the workdir; cnn_lab.train then runs the loop on what it returns.
"""

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from cnn_lab import (
    averaging,
    checkpoint,
    checkpoint_policy,
    evaluation,
    loss_scaling,
    optim,
    steps,
    transfer,
)
from cnn_lab import workdir as workdir_lib
from cnn_lab.averaging import Averaging
from cnn_lab.data import augment, inputs, sources
from cnn_lab.metric_writer import MetricWriter
from cnn_lab.models import conv_implementation, get_model
from cnn_lab.runtime import provenance, sharding
from cnn_lab.state import TrainState, init_state, record_validation, start_from


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
    fresh = _state_maker(config, model, mesh, averages, image_shape)
    normalize = augment.normalizer(tuple(config.data.mean), tuple(config.data.std))
    train_steps = [_train_step(config, model, mesh, data, phase, averages) for phase in phases]
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
            state = restored
        else:
            state = _fresh_start(config, fresh, phases[0].tx, averages, replicated)
            # An earlier attempt's outputs must not mix into the fresh start's.
            checkpoint_policy.move_previous_attempt(workdir, latest)
        step = int(state.step)
        policy = checkpoint_policy.CheckpointPolicy(latest, workdir, snapshot_steps)

        writer = MetricWriter(workdir, enabled=is_lead, resume_step=step, config=config)
        if is_lead:
            _record_and_announce(
                config, workdir, model, mesh, data, state, image_shape, resumed=restored is not None
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


def _state_maker(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    mesh: Mesh,
    averages: Averaging,
    image_shape: tuple[int, int, int],
) -> Callable[..., TrainState]:
    """`fresh(tx, abstract=False)`: a fresh state for a phase's optimizer (its state's layout
    changes with phases)."""
    return functools.partial(
        init_state,
        model,
        plateau=optim.make_plateau(config.schedule),
        rng=jax.random.PRNGKey(config.seed),
        image_shape=image_shape,
        mesh=mesh,
        averaging=averages,
        loss_scale=loss_scaling.from_config(config.model.compute_dtype, config.train),
    )


def _train_step(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    mesh: Mesh,
    data: inputs.Inputs,
    phase: optim.Phase,
    averages: Averaging,
) -> Callable:
    """The jitted train step of `phase` (compiled when first called)."""
    return steps.jit_train_step(
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


def _fresh_start(
    config: ml_collections.ConfigDict,
    fresh: Callable[..., TrainState],
    tx: optax.GradientTransformation,
    averages: Averaging,
    replicated: jax.sharding.Sharding,
) -> TrainState:
    """The state a fresh run starts from: `fresh(tx)`, with config.init_from's weights where it
    names any."""
    state = fresh(tx)
    if not config.init_from.workdir:
        return state
    variables = transfer.initial_variables(config.init_from, state.variables)
    start = functools.partial(start_from, tx=tx, averaging=averages)
    return jax.jit(start, out_shardings=replicated)(state, variables)


def _record_and_announce(
    config: ml_collections.ConfigDict,
    workdir: Path,
    model: nn.Module,
    mesh: Mesh,
    data: inputs.Inputs,
    state: TrainState,
    image_shape: tuple[int, int, int],
    *,
    resumed: bool,
) -> None:
    """Write config.json (with what produced the run) and the class names; print the model."""
    step = int(state.step)
    produced_by = provenance.collect(mesh, conv_implementation(model))
    workdir_lib.write_config(workdir, config, produced_by, resumed_at=step)
    sources.write_class_names(workdir, config.data)
    images, key = jnp.zeros((1, *image_shape)), jax.random.PRNGKey(0)
    console = {"width": 120, "force_terminal": sys.stdout.isatty()}  # No ANSI in files.
    print(model.tabulate(key, images, train=False, console_kwargs=console))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    start = f"starting from {config.init_from.workdir or 'scratch'}"
    start = f"resuming at step {step}" if resumed else start
    print(
        f"{config.model.name}: {n_params:,} parameters; "
        + ", ".join(f"{data.num_examples(s)} {s}" for s in ("train", "val", "test"))
        + f" examples ({data.mode} input); {mesh.size} device(s); {start}"
    )
