"""`cnn-lab <command> [flags...]`: one console script for the `python -m` commands.

Each command runs its module as `__main__`, as `python -m <module>` does, so its flags,
output, exit codes and signal handling are that command's own. Standard library only, and
nothing imported before the command runs: cnn_lab.train installs its SIGTERM handler before
it imports JAX.
"""

import difflib
import os
import runpy
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    """A verb of `cnn-lab`: the module its `python -m` form runs, and what it does."""

    module: str
    summary: str


COMMANDS = {
    "train": Command("cnn_lab.train", "train and evaluate a config; rerun to resume"),
    "evaluate": Command("cnn_lab.evaluate", "evaluate runs: checkpoints, TTA, ensembles"),
    "predict": Command("cnn_lab.predict", "classify image files with a trained run"),
    "export": Command("cnn_lab.export", "export a run's model as StableHLO or a SavedModel"),
    "import-weights": Command(
        "cnn_lab.import_weights", "turn torchvision/timm ImageNet weights into a run"
    ),
    "inspect": Command("cnn_lab.tools.inspect_run", "plot filters, top patches and confusions"),
    "summary": Command("cnn_lab.summary", "per-layer shapes, parameters and FLOPs of a config"),
    "benchmark": Command("cnn_lab.benchmark", "measure a config's speed on this machine"),
    "report": Command("cnn_lab.report", "summarise a sweep's runs as a table"),
    "cascade": Command(
        "cnn_lab.cascade", "model cascades of finished runs: cheap models answer first"
    ),
    "sweep": Command("cnn_lab.launch.sweep", "run a config's grid, locally or on SLURM"),
    "local": Command("cnn_lab.launch.local", "start a multi-process run on this machine"),
    "slurm": Command("cnn_lab.launch.slurm", "train on a SLURM cluster"),
    "tpu": Command("cnn_lab.launch.tpu", "train on every worker of a Cloud TPU VM slice"),
    "fashion-mnist-folder": Command(
        "cnn_lab.launch.fashion_mnist_folder", "write Fashion-MNIST as a folder of PNG files"
    ),
    "fashion-mnist-results": Command(
        "cnn_lab.launch.fashion_mnist_results", "rerun README's Fashion-MNIST results, resumably"
    ),
    "baseline": Command("cnn_lab.baseline", "scikit-learn classifiers on a config's pixels"),
}
EXAMPLE = "cnn-lab train --config=cnn_lab:lenet_digits --workdir=runs/lenet_digits"


def usage() -> str:
    """The usage line, every command with its summary, and an example."""
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items())
    return (
        "usage: cnn-lab <command> [flags...]   (or: python -m cnn_lab <command> ...)\n\n"
        f"commands:\n{commands}\n\n"
        "`cnn-lab <command> --help` (or `cnn-lab help <command>`) shows a command's flags.\n"
        f"example: {EXAMPLE}"
    )


def unknown_command_message(name: str) -> str:
    """One `error:` line naming `name` and the closest commands."""
    close = difflib.get_close_matches(name, COMMANDS, n=3, cutoff=0.5)
    hint = (
        f"Did you mean {' or '.join(close)}?" if close else f"The commands: {', '.join(COMMANDS)}."
    )
    return (
        f"error: {name!r} is not a cnn-lab command. {hint} Run `cnn-lab --help` for each one's use."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run `argv[1]`'s module as `__main__` with the rest of argv as its own arguments."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help") or argv[1:] == ["help"]:
        print(usage())
        sys.exit(0)
    name, args = argv[1], argv[2:]
    if name == "help":  # `cnn-lab help train`, as git and pip do: the command's own help.
        name, args = args[0], ["--help"]
    if name not in COMMANDS:
        print(unknown_command_message(name), file=sys.stderr)
        sys.exit(2)
    # `python -m` puts the working directory first on sys.path (a config file there may
    # import its neighbours); a console script puts its bin/ directory there instead.
    if not sys.flags.safe_path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # runpy sets argv[0] to the module's file, as `python -m` does; the rest are its flags.
    sys.argv = [f"cnn-lab {name}", *args]
    runpy.run_module(COMMANDS[name].module, run_name="__main__", alter_sys=True)
