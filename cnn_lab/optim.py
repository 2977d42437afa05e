"""The optimizer as one optax chain, learning-rate schedules and training phases, from the config."""

import dataclasses
import math
from collections.abc import Callable

import jax
import ml_collections
import optax

from cnn_lab import param_groups

OPTIMIZERS = ("sgd", "adam", "adamw")  # config.optimizer.name
SCHEDULES = ("cosine", "constant", "piecewise", "cyclic_cosine", "plateau")  # config.schedule.name


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """The one place durations in epochs become optimizer steps."""
    return math.ceil(epochs * steps_per_epoch)


def make_schedule(
    schedule_config: ml_collections.ConfigDict,
    learning_rate: float,
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.Schedule:
    """Learning rate as a function of the step: constant | piecewise | cosine | cyclic_cosine | plateau.

    `plateau` is constant here; its decays come from `make_plateau`, driven by validation.
    `cyclic_cosine` restarts a cosine decay `schedule_config.cycles` times (SGDR without
    growth; the snapshot ensembles of Huang et al. 2017), ending at `cycle_ends`.
    """
    name = schedule_config.name
    warmup = epochs_to_steps(schedule_config.warmup_epochs, steps_per_epoch)
    if name in ("constant", "plateau"):
        main = optax.constant_schedule(learning_rate)
    elif name == "piecewise":
        main = optax.piecewise_constant_schedule(
            learning_rate,
            {
                epochs_to_steps(e, steps_per_epoch) - warmup: schedule_config.decay_factor
                for e in schedule_config.decay_epochs
            },
        )
    elif name == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup, 1))
    elif name == "cyclic_cosine":
        ends = cycle_ends(schedule_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        starts = [warmup, *ends[:-1]]
        main = optax.join_schedules(
            [
                optax.cosine_decay_schedule(learning_rate, e - s)
                for s, e in zip(starts, ends, strict=True)
            ],
            boundaries=[e - warmup for e in ends[:-1]],
        )
    else:
        raise ValueError(
            f"Unknown schedule {name!r} (config.schedule.name). Known: {', '.join(SCHEDULES)}."
        )
    if not warmup:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup), main], boundaries=[warmup]
    )


def cycle_ends(
    schedule_config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int
) -> list[int]:
    """The steps at which each cycle of `cyclic_cosine` ends (and a snapshot is taken); else []."""
    if schedule_config.name != "cyclic_cosine":
        return []
    warmup = epochs_to_steps(schedule_config.warmup_epochs, steps_per_epoch)
    cycles = schedule_config.cycles
    if not 1 <= cycles <= total_steps - warmup:
        raise ValueError(
            f"config.schedule.cycles={cycles} does not fit {total_steps - warmup} steps after "
            "warm-up. Use between 1 and that many cycles, or train for more epochs."
        )
    return [warmup + round(i * (total_steps - warmup) / cycles) for i in range(1, cycles + 1)]


def make_plateau(schedule_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Reduce-on-plateau, fed `1 - validation accuracy` once per epoch (AlexNet's recipe)."""
    return optax.contrib.reduce_on_plateau(
        factor=schedule_config.decay_factor,
        patience=schedule_config.plateau_patience,
        rtol=0.0,
        atol=schedule_config.plateau_min_delta,
        accumulation_size=1,
    )


# Moves the reduce-on-plateau state (TrainState.plateau) by one validation accuracy, a scalar.
PlateauFeedback = Callable[[optax.OptState, jax.Array], optax.OptState]


def plateau_feedback(schedule_config: ml_collections.ConfigDict) -> PlateauFeedback:
    """What one epoch's validation accuracy does to the `make_plateau` state.

    The `plateau` schedule feeds it `1 - accuracy`; every other schedule leaves it as it is,
    so their rates are never cut when validation stalls.
    """
    if schedule_config.name != "plateau":
        return lambda plateau_state, accuracy: plateau_state
    plateau = make_plateau(schedule_config)

    def feed(plateau_state: optax.OptState, accuracy: jax.Array) -> optax.OptState:
        # optax.contrib.reduce_on_plateau averages the value with its int32 count.
        with jax.numpy_dtype_promotion("standard"):
            _, plateau_state = plateau.update({}, plateau_state, value=1.0 - accuracy)
        return plateau_state

    return feed


def _decay_mask(params: optax.Params) -> optax.Params:
    # Kernels decay; biases and normalisation scales/offsets (1-D) do not.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _base(
    optimizer_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> list[optax.GradientTransformation]:
    """(L2 weight decay ->) sgd | adam | adamw with `schedule` as learning rate."""
    oc = optimizer_config
    # sgd and adam take weight decay as an L2 term in the gradient (as in the papers);
    # adamw decouples it from the adaptive scaling (Loshchilov & Hutter, 2019).
    l2 = [optax.add_decayed_weights(oc.weight_decay, _decay_mask)] if oc.weight_decay else []
    if oc.name == "sgd":
        return [*l2, optax.sgd(schedule, momentum=oc.momentum or None, nesterov=oc.nesterov)]
    if oc.name == "adam":
        return [*l2, optax.adam(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps)]
    if oc.name == "adamw":
        return [
            optax.adamw(
                schedule,
                b1=oc.b1,
                b2=oc.b2,
                eps=oc.eps,
                weight_decay=oc.weight_decay,
                mask=_decay_mask,
            )
        ]
    raise ValueError(
        f"Unknown optimizer {oc.name!r} (config.optimizer.name). Known: {', '.join(OPTIMIZERS)}."
    )


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    *,
    frozen: tuple[str, ...] = (),
    groups: tuple[tuple[str, float], ...] = (),
) -> optax.GradientTransformation:
    """clip -> (L2 weight decay) -> sgd | adam | adamw with `schedule` as learning rate.

    Parameters matching a `frozen` pattern get zero updates and no optimizer state; each of
    the `groups` ((pattern, multiplier), ...: config.optimizer.param_groups) has its own
    optimizer with the learning rate times its multiplier (optax.multi_transform). Without
    either, the chain (and its state) is the plain one.
    """
    oc = optimizer_config
    clip = [optax.clip_by_global_norm(oc.grad_clip_norm)] if oc.grad_clip_norm else []
    if not frozen and not groups:
        return optax.chain(*clip, *_base(oc, schedule))

    def labels(params):
        return param_groups.labels(params, frozen, groups)

    def scaled(multiplier: float) -> optax.Schedule:
        return lambda count: multiplier * schedule(count)

    transforms = {
        param_groups.FROZEN: optax.set_to_zero(),
        param_groups.DEFAULT: optax.chain(*_base(oc, schedule)),
        **{
            param_groups.group_name(i): optax.chain(*_base(oc, scaled(multiplier)))
            for i, (_, multiplier) in enumerate(groups)
        },
    }

    def is_frozen(params):
        return jax.tree.map(lambda label: label == param_groups.FROZEN, labels(params))

    # Frozen gradients are zeroed first, so they do not count in the clipped global norm.
    zero_frozen = [optax.masked(optax.set_to_zero(), is_frozen)] if clip and frozen else []
    return optax.chain(*zero_frozen, *clip, optax.multi_transform(transforms, labels))


PHASE_KEYS = ("epochs", "freeze", "learning_rate")


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps [start, end) of a run, trained by `tx`; `frozen` parameters do not move.

    Each phase's optimizer starts afresh at `start` (its state holds only the parameters it
    trains), and its learning-rate schedule runs over the phase's own steps.
    """

    index: int
    start: int
    end: int
    frozen: tuple[str, ...]
    schedule: optax.Schedule  # Learning rate at a step of the run (not of the phase).
    tx: optax.GradientTransformation


def _phase_specs(config: ml_collections.ConfigDict) -> tuple[dict, ...]:
    """config.phases, checked; () becomes one phase of the whole run, nothing frozen."""
    specs = tuple(dict(p) for p in config.phases) or (dict(epochs=config.train.num_epochs),)
    for i, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(PHASE_KEYS))
        if unknown or not spec.get("epochs", 0) > 0:
            raise ValueError(
                f"config.phases[{i}]={spec}: a phase is a dict with epochs > 0 and optionally "
                f"freeze (patterns) and learning_rate; unknown keys {unknown}."
            )
    total = sum(spec["epochs"] for spec in specs)
    if not math.isclose(total, config.train.num_epochs):
        raise ValueError(
            f"config.phases last {total} epochs in all, but config.train.num_epochs="
            f"{config.train.num_epochs}. Make the phases' epochs add up to num_epochs."
        )
    if len(specs) > 1 and config.schedule.name == "cyclic_cosine":
        raise ValueError(
            "config.schedule.name='cyclic_cosine' (snapshot cycles over the whole run) cannot "
            "be split into config.phases. Use another schedule, or a single phase."
        )
    return specs


def make_phases(
    config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int
) -> list[Phase]:
    """The run's phases (config.phases; one phase if none), covering steps [0, total_steps)."""
    phases, start, epochs = [], 0, 0.0
    specs = _phase_specs(config)
    for index, spec in enumerate(specs):
        epochs += spec["epochs"]
        end = total_steps if index == len(specs) - 1 else epochs_to_steps(epochs, steps_per_epoch)
        local = make_schedule(
            config.schedule,
            spec.get("learning_rate", config.optimizer.learning_rate),
            steps_per_epoch=steps_per_epoch,
            total_steps=end - start,
        )
        frozen = tuple(spec.get("freeze", ()))
        phases.append(
            Phase(
                index=index,
                start=start,
                end=end,
                frozen=frozen,
                schedule=local if start == 0 else _shifted(local, start),
                tx=make_optimizer(
                    config.optimizer,
                    local,
                    frozen=frozen,
                    groups=tuple(tuple(g) for g in config.optimizer.param_groups),
                ),
            )
        )
        start = end
    return phases


def _shifted(schedule: optax.Schedule, start: int) -> optax.Schedule:
    return lambda step: schedule(step - start)


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that trains step `step` + 1 (the last phase once training is done)."""
    return next((p for p in phases if step < p.end), phases[-1])


def from_config(
    config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int
) -> tuple[optax.Schedule, optax.GradientTransformation, optax.GradientTransformation]:
    """(schedule, optimizer, plateau tracker) of a run config's first phase."""
    first = make_phases(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)[0]
    return first.schedule, first.tx, make_plateau(config.schedule)
