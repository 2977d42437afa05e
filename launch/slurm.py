"""Train on a SLURM cluster: write an sbatch script that runs `srun python -m cnn_lab.train`.

    python -m launch.slurm --config=configs/resnet20_cifar10.py --workdir=runs/r20 \\
        --nodes=2 --gpus_per_node=4 --process_per=gpu --time=04:00:00 --partition=gpu \\
        [--config.<field>=<value> ...] [--dry_run]

Writes <workdir>/job.sbatch, submits it, and logs to <workdir>/slurm-<job id>.out. Under srun,
train starts jax.distributed from SLURM's variables. Before the time limit (and on
preemption) SLURM sends SIGTERM; train saves and exits with PREEMPTED_EXIT_CODE, and the
script puts the job back in the queue, where it resumes from that checkpoint.
"""

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from cnn_lab import command_line
from cnn_lab.launch import children, command

PREEMPTED_EXIT_CODE = children.STOPPED_EXIT_CODE


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one SLURM job (or each task of a job array) asks for."""

    nodes: int = 1
    gpus_per_node: int = 0
    process_per: str = "node"  # node | gpu: one train process per node, or per GPU.
    cpus_per_task: int = 2
    time: str = "01:00:00"  # Time limit, HH:MM:SS or D-HH:MM:SS.
    partition: str | None = None
    grace_seconds: int = 300  # SIGTERM this long before the time limit, to save and requeue.
    requeue: bool = True
    sbatch_options: tuple[str, ...] = ()  # Further `#SBATCH` options, e.g. "--account=lab".

    def __post_init__(self):
        if self.process_per not in ("node", "gpu"):
            raise ValueError(
                f"--process_per={self.process_per!r}: use 'node' (one process sees every GPU "
                "of its node) or 'gpu' (one process per GPU)."
            )
        if self.process_per == "gpu" and self.gpus_per_node < 1:
            raise ValueError(
                "--process_per=gpu needs --gpus_per_node >= 1; with no GPUs use --process_per=node."
            )

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.process_per == "gpu" else 1


def define_resource_flags() -> Callable[[], Resources]:
    """Define the resource flags (shared by the SLURM launcher and the sweep runner)."""
    default = Resources()
    nodes = flags.DEFINE_integer("nodes", default.nodes, "Nodes per run.")
    gpus = flags.DEFINE_integer("gpus_per_node", default.gpus_per_node, "GPUs per node.")
    process_per = flags.DEFINE_enum(
        "process_per", default.process_per, ["node", "gpu"], "One train process per node or GPU."
    )
    cpus = flags.DEFINE_integer("cpus_per_task", default.cpus_per_task, "CPUs per process.")
    time = flags.DEFINE_string("time", default.time, "Time limit per job (HH:MM:SS).")
    partition = flags.DEFINE_string("partition", None, "SLURM partition (default: the cluster's).")
    grace = flags.DEFINE_integer(
        "grace_seconds", default.grace_seconds, "SIGTERM this long before the time limit."
    )
    requeue = flags.DEFINE_bool("requeue", default.requeue, "Requeue after preemption.")
    options = flags.DEFINE_multi_string("sbatch", [], "Extra #SBATCH option, e.g. --account=lab.")

    def resources() -> Resources:
        return Resources(
            nodes=nodes.value,
            gpus_per_node=gpus.value,
            process_per=process_per.value,
            cpus_per_task=cpus.value,
            time=time.value,
            partition=partition.value,
            grace_seconds=grace.value,
            requeue=requeue.value,
            sbatch_options=tuple(options.value),
        )

    return resources


def sbatch_script(
    resources: Resources,
    run: str,
    *,
    job_name: str,
    log: str | Path,
    array: str | None = None,
) -> str:
    """A bash script for sbatch that runs the shell command `run`, requeued when preempted.

    `log`: SLURM's output file pattern (%j job id, %A_%a array job and task); `array`: the
    `--array` specification, e.g. "0,3,5%2".
    """
    options = [
        f"--job-name={job_name}",
        f"--nodes={resources.nodes}",
        f"--ntasks-per-node={resources.tasks_per_node}",
        f"--cpus-per-task={resources.cpus_per_task}",
        f"--time={resources.time}",
        f"--output={log}",
        "--open-mode=append",  # A requeued job continues its log.
        # SIGTERM to the job's steps (srun forwards it to train) before the time limit.
        f"--signal=TERM@{resources.grace_seconds}",
    ]
    if resources.gpus_per_node:
        options.append(f"--gpus-per-node={resources.gpus_per_node}")
    if resources.partition:
        options.append(f"--partition={resources.partition}")
    if array:
        options.append(f"--array={array}")
    options.append("--requeue" if resources.requeue else "--no-requeue")
    options.extend(resources.sbatch_options)
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options), ""]
    lines += [f"cd {shlex.quote(str(Path.cwd()))}", run, "status=$?"]
    if resources.requeue:
        lines += [
            f"# {PREEMPTED_EXIT_CODE}: the run saved a checkpoint on SIGTERM; queue it again to resume.",
            f'if [ "$status" -eq {PREEMPTED_EXIT_CODE} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        ]
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


def submit(script: Path, *, wait: bool) -> subprocess.CompletedProcess:
    """`sbatch [--wait] <script>` from the script's directory; with `wait`, the job's exit code."""
    return subprocess.run(
        ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)],
        cwd=script.parent,
        capture_output=True,
        text=True,
        check=False,
    )


def main() -> None:
    """Command line: see the module docstring."""
    config = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:mode]).", lock_config=True
    )
    workdir = flags.DEFINE_string("workdir", None, "The run's directory (shared by all nodes).")
    dry_run = flags.DEFINE_bool("dry_run", False, "Print the sbatch script; submit nothing.")
    wait = flags.DEFINE_bool("wait", False, "Block until the job ends; exit with its code.")
    python = flags.DEFINE_string("python", sys.executable, "Python on the compute nodes.")
    resources = define_resource_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments {argv[1:]}; overrides are --config.<field>=<v>.")
        config_file, overrides = command.config_flag_overrides(config)
        rundir = Path(workdir.value).absolute()
        train = command.train_command(config_file, rundir, overrides, python=python.value)
        try:
            script = sbatch_script(
                resources(),
                shlex.join(["srun", *train]),
                job_name=f"cnn_lab-{rundir.name}",
                log=rundir / "slurm-%j.out",
            )
        except ValueError as error:
            sys.exit(f"error: {error}")
        if dry_run.value:
            print(script, end="")
            return
        rundir.mkdir(parents=True, exist_ok=True)  # sbatch needs the log's directory.
        path = rundir / "job.sbatch"
        path.write_text(script)
        try:
            result = submit(path, wait=wait.value)
        except FileNotFoundError:
            sys.exit(f"error: sbatch not found; run on a SLURM login node (script: {path}).")
        job = result.stdout.strip().split(";")[0]
        print(f"job {job}: {path}; log {rundir / f'slurm-{job}.out'}" if job else result.stderr)
        sys.exit(result.returncode)

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
