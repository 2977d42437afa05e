"""What a user gives a run (config values, the workdir, command-line flags), checked before
anything is written, and mistakes reported as one `error:` paragraph instead of a traceback.

Set CNN_LAB_VERBOSE=1 to see the traceback behind an `error:` line.
"""

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import ml_collections
from jax.sharding import Mesh

from cnn_lab import averaging, optim, wandb_writer
from cnn_lab.data import augment, loading
from cnn_lab.models import get_model
from cnn_lab.runtime import sharding

VERBOSE_ENV = "CNN_LAB_VERBOSE"  # Set (to anything but "" or "0"): tracebacks, not error lines.

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
    is touched.
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
    _check_channels(config.data)
    loading.check_classes(config.data, config.model.num_classes)


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


def report(error: BaseException) -> NoReturn:
    """Exit with `error:` and the message (it says what to change); CNN_LAB_VERBOSE: re-raise."""
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        raise error
    sys.exit(f"error: {_without_traceback(str(error))}")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), mistakes as `report`s.

    A misspelled `--config.<field>` override, an unknown flag, a bad value or a config file
    that does not load each become one `error:` paragraph naming the flag and the fix.
    """
    from absl import flags
    from ml_collections import config_flags

    try:
        rest = flags.FLAGS(list(argv))
    except KeyError as error:  # ml_collections: an override of a field the config lacks.
        report(ValueError(_unknown_field_message(error, argv)))
    except (flags.Error, ValueError, TypeError, AttributeError) as error:
        message = _without_traceback(str(error))
        report(ValueError(f"{message} Run with --helpfull to list every flag."))
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if config_flags.config_flags.is_config_flag(flag) and flag.value is not None:
            try:
                flag.value.keys()  # A config file that failed to load raises at first access.
            except OSError as error:
                reason = str(error.__cause__ or error).strip().splitlines()[-1].strip()
                report(
                    ValueError(
                        f"--{name}={config_flags.get_config_filename(flag)} cannot be loaded "
                        f"({reason}). Pass a config file, e.g. --{name}=configs/lenet_digits.py."
                    )
                )
    return rest


def _unknown_field_message(error: KeyError, argv: Sequence[str]) -> str:
    """'--config.optimzer.lr: ... no field optimzer. Did you mean "optimizer" ...?'"""
    field, *hint = str(error.args[0]).split("\n")
    field = field.strip("'\"")
    flag_names = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    override = next((f for f in flag_names if field in f.split(".")[1:]), "an override")
    suggestion = " ".join(hint) or "Check its spelling."
    return (
        f"{override}: the config has no field {field!r}. {suggestion} Run with --helpfull "
        "to list the config's fields."
    )


def _without_traceback(message: str) -> str:
    """A message that embeds a traceback (a config file that raised), as its first and last lines."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not any(line.startswith("Traceback") for line in lines):
        return message
    return f"{lines[0]} {lines[-1]}"
