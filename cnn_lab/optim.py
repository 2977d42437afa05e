"""The optimizer as one optax chain, and learning-rate schedules, built from the config."""

import math

import jax
import ml_collections
import optax


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
            f"Unknown schedule {name!r} (config.schedule.name). "
            "Known: constant, piecewise, cosine, cyclic_cosine, plateau."
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


def _decay_mask(params: optax.Params) -> optax.Params:
    # Kernels decay; biases and normalisation scales/offsets (1-D) do not.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(
    optimizer_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """clip -> (L2 weight decay) -> sgd | adam | adamw with `schedule` as learning rate."""
    oc = optimizer_config
    clip = [optax.clip_by_global_norm(oc.grad_clip_norm)] if oc.grad_clip_norm else []
    # sgd and adam take weight decay as an L2 term in the gradient (as in the papers);
    # adamw decouples it from the adaptive scaling (Loshchilov & Hutter, 2019).
    l2 = [optax.add_decayed_weights(oc.weight_decay, _decay_mask)] if oc.weight_decay else []
    if oc.name == "sgd":
        base = [optax.sgd(schedule, momentum=oc.momentum or None, nesterov=oc.nesterov)]
    elif oc.name == "adam":
        base = [optax.adam(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps)]
    elif oc.name == "adamw":
        l2 = []
        base = [
            optax.adamw(
                schedule,
                b1=oc.b1,
                b2=oc.b2,
                eps=oc.eps,
                weight_decay=oc.weight_decay,
                mask=_decay_mask,
            )
        ]
    else:
        raise ValueError(
            f"Unknown optimizer {oc.name!r} (config.optimizer.name). Known: sgd, adam, adamw."
        )
    return optax.chain(*clip, *l2, *base)


def from_config(
    config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int
) -> tuple[optax.Schedule, optax.GradientTransformation, optax.GradientTransformation]:
    """(schedule, optimizer, plateau tracker) of a whole run config."""
    schedule = make_schedule(
        config.schedule,
        config.optimizer.learning_rate,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    return schedule, make_optimizer(config.optimizer, schedule), make_plateau(config.schedule)
