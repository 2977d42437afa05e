"""The commands' flags and errors: parsing, `--help`, and one `error:` paragraph per mistake.

Light on purpose (no JAX, no TensorFlow): the launchers parse their flags with it too. Set
CNN_LAB_VERBOSE=1 to see the traceback behind an `error:` line.
"""

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

VERBOSE_ENV = "CNN_LAB_VERBOSE"  # Set (to anything but "" or "0"): tracebacks, not error lines.
# Flags that print a command's help and exit 0 (absl's own exit 1 and list no configs).
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def report(error: BaseException) -> NoReturn:
    """Exit with `error:` and the message (it says what to change); CNN_LAB_VERBOSE: re-raise."""
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        raise error
    sys.exit(f"error: {_without_traceback(str(error))}")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), mistakes as `report`s.

    A misspelled `--config.<field>` override, an unknown flag, a bad value or a config file
    that does not load each become one `error:` paragraph naming the flag and the fix. The
    libraries' absl log lines are hidden unless --verbosity is given (e.g. --verbosity=0).
    """
    from absl import flags, logging
    from ml_collections import config_flags

    from cnn_lab import config_help

    try:  # --config=cnn_lab:<name>: the shipped file, wherever the package is installed.
        argv = [
            f"--config={config_help.config_file(arg[len('--config=') :])}"
            if arg.startswith("--config=")
            else arg
            for arg in argv
        ]
    except ValueError as error:
        report(error)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(_help(argv))
        sys.exit(0)
    try:
        rest = flags.FLAGS(list(argv))
    except (KeyError, flags.Error, ValueError, TypeError, AttributeError) as error:
        if missing := missing_field(error):
            message = unknown_field_message(missing, argv)
            report(ValueError(f"{message} Run with --helpfull to list the config's fields."))
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
    if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log every file they touch.
        logging.set_verbosity(logging.FATAL)
    return rest


def _help(argv: Sequence[str]) -> str:
    """The main module's docstring and flags; for a command taking --config, the shipped
    configs, or the fields of the config that --config names (with its overrides)."""
    from absl import flags
    from ml_collections import config_flags

    from cnn_lab import config_help

    # The command's own flags (entry points such as cnn_lab/evaluate.py define them elsewhere).
    own = [
        m
        for m in flags.FLAGS.flags_by_module_dict()
        if m in (argv[0], "__main__") or m.startswith("cnn_lab.")
    ]
    flags_help = (
        flags.FLAGS.get_help()
        if "--helpfull" in argv
        else "\n".join(flags.FLAGS.module_help(m) for m in own)
    )
    doc = (sys.modules.get(own[0] if own else "") or sys.modules["__main__"]).__doc__ or ""
    if "config" not in flags.FLAGS:
        return f"{doc.strip()}\n\nflags:\n{flags_help}"
    config_args = [a for a in argv[1:] if a.startswith("--config=") or a.startswith("--config.")]
    if not any(a.startswith("--config=") for a in config_args):
        return config_help.usage(doc, flags_help, None)
    only_config = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=only_config)
    try:
        only_config([argv[0], *config_args])
        config = only_config.config
    except (KeyError, flags.Error, OSError, ValueError) as error:
        report(ValueError(f"{_without_traceback(str(error))} (while showing --help)"))
    path = config_flags.get_config_filename(only_config["config"]).partition(":")[0]
    return config_help.usage(doc, flags_help, config, path)


def missing_field(error: BaseException | None) -> KeyError | None:
    """The KeyError of an override naming a field the config lacks, if `error` comes from one.

    ml_collections raises it for a top-level field, and an AttributeError from it for a
    nested one (`--config.optimizer.learnig_rate`).
    """
    while error is not None and not isinstance(error, KeyError):
        error = error.__cause__ or error.__context__
    return error


def unknown_field_message(error: KeyError, argv: Sequence[str]) -> str:
    """'--config.optimzer.lr: the config has no field 'optimzer'. Did you mean "optimizer" ...?'"""
    field, *hint = str(error.args[0]).split("\n")
    field = field.strip("'\"")
    flag_names = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    override = next((f for f in flag_names if field in f.split(".")[1:]), "an override")
    suggestion = " ".join(hint) or "Check its spelling."
    return f"{override}: the config has no field {field!r}. {suggestion}"


def _without_traceback(message: str) -> str:
    """A message that embeds a traceback (a config file that raised), as its first and last lines."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not any(line.startswith("Traceback") for line in lines):
        return message
    return f"{lines[0]} {lines[-1]}"
