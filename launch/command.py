"""The train command line every launcher runs, and the check of its overrides before launch."""

import sys
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from cnn_lab import command_line, sweep

ENTRY_POINT = ("-m", "cnn_lab.train")  # What every launcher runs, after the Python interpreter.


def train_command(
    config: str, workdir: str | Path, overrides: sweep.Overrides, *, python: str = sys.executable
) -> list[str]:
    """`python -m cnn_lab.train --config=<file[:mode]> --workdir=<dir> --config.<field>=<v>...`."""
    return [
        python,
        *ENTRY_POINT,
        f"--config={config}",
        f"--workdir={workdir}",
        *sweep.override_flags(overrides),
    ]


def check_overrides(config: str, overrides: sweep.Overrides) -> ml_collections.ConfigDict:
    """The config with `overrides` applied, parsed from their flag text exactly as train does.

    Raises ValueError naming the override to fix, before any job is launched.
    """
    argv = ["launch", f"--config={config}", *sweep.override_flags(overrides)]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    try:
        flag_values(argv)
        config = flag_values.config
        config.keys()  # A config file that failed to load raises its error on first use.
        return config
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as error:
        if missing := command_line.missing_field(error):
            detail = command_line.unknown_field_message(missing, argv)
        else:
            detail = " ".join(str(error).split()).rstrip(".") + "."
        raise ValueError(
            f"The overrides {' '.join(argv[2:]) or '(none)'} do not apply to --config={config}: "
            f"{detail} Check each field name against the config file and each value's type."
        ) from error


def config_flag_overrides(config_flag: flags.FlagHolder) -> tuple[str, sweep.Overrides]:
    """The config file argument and the `--config.<field>` overrides given on a command line."""
    holder = flags.FLAGS[config_flag.name]
    return config_flags.get_config_filename(holder), config_flags.get_override_values(holder)
