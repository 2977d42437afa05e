"""What a user gives a run (config values, the workdir), checked before anything is written:
each mistake is a ValueError whose message names the value and the fix (the commands print it
as one `error:` paragraph, cnn_lab.command_line.report)."""

import os
import sys
from pathlib import Path

import ml_collections
from jax.sharding import Mesh

from cnn_lab import averaging, optim, wandb_writer
from cnn_lab.data import augment, loading
from cnn_lab.models import get_model
from cnn_lab.runtime import host, sharding

# (field, smallest valid value, a valid example, what it is): the integer fields.
_MINIMUMS = (
    ("train.batch_size", 1, 128, "the global batch (examples per step over all devices)"),
    ("eval.batch_size", 1, 512, "the global evaluation batch"),
    ("train.grad_accumulation_steps", 1, 1, "the micro-batches per step"),
    ("train.num_epochs", 1, 30, "the epochs to train"),
    ("train.log_every_steps", 1, 50, "the steps between metric writes"),
    ("checkpoint.keep", 1, 3, "the latest checkpoints kept (0 leaves none to resume from)"),
    ("checkpoint.every_steps", 0, 0, "the steps between extra saves (0: at epoch ends only)"),
    ("train.early_stopping_patience", 1, 5, "the epochs without gain to stop after (None: off)"),
)
_OPTIONAL = {"train.early_stopping_patience"}  # None switches these off.


def validate(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Raise ValueError naming the first config value a run on `mesh` cannot use, and a valid one.

    Reads nothing but the data set's description (its classes): run it before the workdir
    is touched. Prints a `warning:` line for each accelerator this run leaves idle.
    """
    for field, minimum, example, meaning in _MINIMUMS:
        section, name = field.split(".")
        value = config[section][name]
        if value is None and field in _OPTIONAL:
            continue
        if not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"config.{field}={value!r} is invalid: it is {meaning}, an integer >= "
                f"{minimum}. Set e.g. --config.{field}={example}."
            )
    _check_names(config)
    wandb_writer.check_installed(config)
    _check_batch_sizes(config, mesh)
    augment.check_flip(config.augment, config.data)
    augment.check_random_erasing(config.augment)
    _check_channels(config.data)
    loading.check_classes(config.data, config.model.num_classes)
    for warning in host.accelerator_warnings(config.model.compute_dtype):
        print(f"warning: {warning}", file=sys.stderr)


def _check_names(config: ml_collections.ConfigDict) -> None:
    """Known optimizer, schedule, model (with its fields) and averages."""
    for section, known in (("optimizer", optim.OPTIMIZERS), ("schedule", optim.SCHEDULES)):
        if config[section].name not in known:
            raise ValueError(
                f"Unknown {section} {config[section].name!r} (config.{section}.name). Known: "
                f"{', '.join(known)}. Set e.g. --config.{section}.name={known[0]}."
            )
    get_model(config.model)  # Raises for an unknown name, field or compute dtype.
    averaging.from_config(config.averaging, steps_per_epoch=1)  # Its checks need no step count.


def _check_batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Batch sizes that split over `mesh`, micro-batches that divide the batch."""
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    micro_batches = config.train.grad_accumulation_steps
    if config.train.batch_size % micro_batches:
        raise ValueError(
            f"config.train.grad_accumulation_steps={micro_batches} must divide "
            f"config.train.batch_size={config.train.batch_size} (each micro-batch holds "
            "batch_size / grad_accumulation_steps examples). Set e.g. "
            "--config.train.grad_accumulation_steps=1."
        )
    sharding.check_batch_size(
        config.train.batch_size // micro_batches,
        mesh,
        "config.train.batch_size / config.train.grad_accumulation_steps",
    )


def _check_channels(data_config: ml_collections.ConfigDict) -> None:
    """One normalisation mean and std per image channel."""
    channels, means, stds = data_config.channels, len(data_config.mean), len(data_config.std)
    if not channels >= 1 or means != channels or stds != channels:
        raise ValueError(
            f"config.data.channels={channels}, but config.data.mean has {means} values and "
            f"config.data.std {stds}. Give one mean and one std per channel (1 for grey "
            "images, 3 for RGB), e.g. --config.data.mean='(0.5,)' --config.data.std='(0.25,)' "
            "with --config.data.channels=1."
        )


def check_workdir(workdir: Path) -> None:
    """Raise ValueError unless `workdir` is, or can be created as, a directory we can write to."""
    path = Path(workdir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"The workdir {workdir} cannot be used: {existing} is a file, not a directory. "
            "Pass a --workdir that is a directory or does not exist yet (it is created)."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"The workdir {workdir} cannot be written: {existing} is read-only for this user. "
            "Pass a --workdir on a writable disk, or make it writable (chmod u+w)."
        )
