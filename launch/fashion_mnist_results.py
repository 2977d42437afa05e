"""README's Fashion-MNIST results, regenerated: `python -m launch.fashion_mnist_results`.

    python -m launch.fashion_mnist_results [--runs_dir=runs/fmnist] [--only=lenet5,resnet20]
        [--records_dir=results/fashion_mnist] [--readme=README.md] [--report_only] [--dry_run]

Runs each step below as its own command, in order, printing it first (`--dry_run` prints
them all and runs nothing): the baselines and a sweep per model family, each followed by
the evaluation of its snapshot or model ensemble once all its runs have finished, then
`cnn_lab.report` over every sweep's records, which rewrites the table between README's
result markers. AlexNet, VGG and ResNet-20 with random erasing run one seed each before the
ablations and their other two seeds after them (`--only=vgg` runs both). Each step resumes:
rerun the command and finished points and seeds are skipped, an interrupted run continues
from its checkpoint. On a shared machine start it with nohup and stop it with
`kill -TERM <its pid>` (docs/scaling_out.md): the running training saves its step, and the
command exits 75; the table shows what has finished so far, with n per row.

The records of every finished run (config, metrics and evaluations: kilobytes, no
checkpoints) are copied into --records_dir after each step, and back into --runs_dir before
it. The repository keeps them in results/fashion_mnist/, so `--report_only` rewrites the
table from a clean clone, and the command continued on a new machine trains only the runs
that no record holds.
"""

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cnn_lab import sweep
from cnn_lab.launch import children

BASELINE = ("-m", "cnn_lab.baseline", "--config=configs/pixels_fashion_mnist.py")
RANDOM_ERASING = "--config.augment.random_erasing=0.5"  # Zhong et al.'s probability.


def _sweep(config: str, seeds: int, *overrides: str) -> tuple[str, ...]:
    """launch.sweep's arguments: configs/<config>_fashion_mnist.py over `seeds` seeds."""
    config_flag = f"--config=configs/{config}_fashion_mnist.py"
    return ("-m", "launch.sweep", config_flag, f"--seeds={seeds}", *overrides)


# (name, the command's arguments after the interpreter): cheap and decisive first, and every
# row's first run before the costly families' further seeds, so that a session cut short
# leaves each row in the table. A name listed twice is one sweep grown by its second step.
STEPS = (
    ("logistic", BASELINE),
    (
        "sklearn_mlp",
        (*BASELINE, "--config.baseline.classifier=mlp", "--config.model.hidden_sizes=(100,)"),
    ),
    ("mlp", _sweep("mlp", 3)),
    ("lenet5", _sweep("lenet", 3)),
    ("convnet", _sweep("convnet", 3)),
    ("resnet20", _sweep("resnet20", 3)),
    ("alexnet", _sweep("alexnet", 1)),
    ("vgg", _sweep("vgg", 1)),
    ("odenet", _sweep("odenet", 1)),
    (
        "odenet_resnet",  # Chen et al.'s control: 6 residual blocks in place of the ODE block.
        _sweep("odenet", 1, "--config.model.residual_blocks=6", "--config.model.im2col=False"),
    ),
    (
        "resnet20_snapshots",
        # One seed: the raw model's 3 seeds show the spread; one ensemble shows the gain.
        _sweep("resnet20", 1, "--config.schedule.name=cyclic_cosine", "--config.schedule.cycles=5"),
    ),
    (
        "resnet20_erasing",
        # Zhong et al.'s random erasing on the same recipe: one seed here, two more at the end.
        _sweep("resnet20", 1, RANDOM_ERASING),
    ),
    (
        "resnet56_sd",
        _sweep(
            "resnet20",
            1,
            "--config.model.depth=56",
            # Half ResNet-20's 40 epochs: 3.5x its step cost made 4 runs of 40 about 12 hours.
            "--config.train.num_epochs=20",
            "--axis=model.stochastic_depth_rate=0,0.1,0.2,0.5",
        ),
    ),
    ("alexnet", _sweep("alexnet", 3)),
    ("vgg", _sweep("vgg", 3)),
    ("resnet20_erasing", _sweep("resnet20", 3, RANDOM_ERASING)),
)
NAMES = tuple(dict.fromkeys(name for name, _ in STEPS))  # Each sweep once, in STEPS' order.
# Evaluations of finished sweeps: (sweep they read, the file each writes into the first run's
# workdir (its record: present, the evaluation is done), the arguments before the runs).
EVALUATIONS = (
    ("resnet20_snapshots", "eval_latest_test.json",
     ("-m", "cnn_lab.evaluate", "--checkpoint=latest", "--variants=raw,snapshots")),
    # The final weights, as the table's other rows are tested (best/ is chosen on validation).
    ("resnet20", "ensemble_latest_test.json",
     ("-m", "cnn_lab.evaluate", "--checkpoint=latest", "--ensemble")),
)  # fmt: skip


def commands(runs_dir: Path, only: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The chosen steps' names and command lines."""
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        raise ValueError(f"--only={','.join(unknown)} names no step. Steps: {', '.join(NAMES)}.")
    chosen = [(n, args) for n, args in STEPS if not only or n in only]
    return [(n, [sys.executable, *args, f"--sweep_dir={runs_dir / n}"]) for n, args in chosen]


def evaluation_commands(runs_dir: Path, only: Sequence[str]) -> list[list[str]]:
    """The evaluations not yet recorded whose sweep has finished every run (an ensemble needs
    them all)."""
    lines = []
    for sweep_name, record, args in EVALUATIONS:
        rows = sweep.read_index(runs_dir / sweep_name)
        done = rows and all(r["status"] == "done" for r in rows)
        recorded = rows and (runs_dir / sweep_name / rows[0]["workdir"] / record).exists()
        if done and not recorded and (not only or sweep_name in only):
            lines.append(
                [sys.executable, *args, *(str(runs_dir / sweep_name / r["workdir"]) for r in rows)]
            )
    return lines


def report_command(records_dir: Path, readme: str, *, dry_run: bool) -> list[str]:
    """`cnn_lab.report` over the records of every step's sweep that has started (all of them
    in a dry run)."""
    sweeps = [records_dir / name for name in NAMES]
    sweeps = [s for s in sweeps if dry_run or (s / sweep.INDEX_FILE).exists()]
    readme_flag = [f"--readme={readme}"] if readme else []
    out = f"--out={records_dir / 'results'}"  # The table as results.md and .csv, kept too.
    return [sys.executable, "-m", "cnn_lab.report", *map(str, sweeps), out, *readme_flag]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs_dir", default="runs/fmnist", help="Where each sweep goes.")
    parser.add_argument(
        "--records_dir",
        default="results/fashion_mnist",
        help="Where each sweep's records are kept, and the report reads them.",
    )
    parser.add_argument("--only", default="", help="Comma-separated steps to run (default: all).")
    parser.add_argument(
        "--readme", default="README.md", help='The report rewrites its table ("": no).'
    )
    parser.add_argument(
        "--report_only", action="store_true", help="Rewrite the table from the records alone."
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the commands, run nothing.")
    args = parser.parse_args(argv)
    runs_dir, records_dir = Path(args.runs_dir), Path(args.records_dir)
    try:
        only = [step for step in args.only.split(",") if step]
        steps = [] if args.report_only else commands(runs_dir, only)
    except ValueError as error:
        sys.exit(f"error: {error}")
    processes = children.Children()
    run = functools.partial(_run, dry_run=args.dry_run, processes=processes)
    if steps and not args.dry_run:
        print(f"Stop this with: kill -TERM {os.getpid()}", flush=True)
    with processes.stopping_on_sigterm():
        for name, line in steps:
            if not args.dry_run and (records_dir / name).exists():
                sweep.copy_records(records_dir / name, runs_dir / name)
            ok = run(line)
            # Right after its sweep: the table shows an ensemble hours before the last step ends.
            for evaluation in evaluation_commands(runs_dir, [name]) if ok else []:
                ok = run(evaluation)
            if not args.dry_run and (runs_dir / name).exists():  # A failed step's runs too.
                sweep.copy_records(runs_dir / name, records_dir / name)
            processes.exit_if_stopped()
            if not ok:
                _fail()
        ok = run(report_command(records_dir, args.readme, dry_run=args.dry_run))
    if not ok:
        _fail()


def _fail() -> None:
    sys.exit(
        "error: the command above failed (its output is above it). Fix what it says, then "
        "rerun the same command: finished runs are skipped and interrupted ones resume."
    )


def _run(line: list[str], *, dry_run: bool, processes: children.Children) -> bool:
    """Print the command line and run it (unless `dry_run`); False if it failed or was stopped."""
    print("$ " + " ".join(line), flush=True)
    return dry_run or processes.run(line) == 0


if __name__ == "__main__":
    main()
