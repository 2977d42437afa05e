"""Train on every worker of a Cloud TPU VM slice, through `gcloud compute tpus tpu-vm ssh`.

    python -m launch.tpu --tpu=my-v4-32 --zone=us-central2-b --config=configs/resnet50_imagenet.py \\
        --workdir=/mnt/shared/runs/r50 [--config.<field>=<value> ...] [--dry_run]

Runs the same train command on all workers at once (`--worker=all`); train starts
jax.distributed from the TPU VM's metadata. The code must already be at --code_dir on every
worker, and --workdir must be a directory all workers share (an NFS or Filestore mount):
process 0 writes the logs and metrics, and every process writes its part of the checkpoints.
"""

import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from cnn_lab import command_line
from cnn_lab.launch import command


def ssh_command(
    *,
    tpu: str,
    zone: str,
    project: str | None,
    code_dir: str,
    train: Sequence[str],
) -> list[str]:
    """The gcloud command that runs `train` in `code_dir` on every worker of the TPU VM."""
    remote = f"cd {shlex.quote(code_dir)} && {shlex.join(train)}"
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        tpu,
        f"--zone={zone}",
        *([f"--project={project}"] if project else []),
        "--worker=all",
        f"--command={remote}",
    ]


def main() -> None:
    """Command line: see the module docstring."""
    config = config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file (configs/*.py[:mode]), relative to --code_dir.",
        lock_config=True,
    )
    workdir = flags.DEFINE_string("workdir", None, "The run's directory, shared by all workers.")
    tpu = flags.DEFINE_string("tpu", None, "Name of the TPU VM.")
    zone = flags.DEFINE_string("zone", None, "Its zone, e.g. us-central2-b.")
    project = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's).")
    code_dir = flags.DEFINE_string(
        "code_dir", "cnn_lab", "The cnn_lab checkout on the workers (relative to home)."
    )
    python = flags.DEFINE_string("python", "python3", "Python on the workers.")
    dry_run = flags.DEFINE_bool("dry_run", False, "Print the gcloud command; run nothing.")
    flags.mark_flags_as_required(["config", "workdir", "tpu", "zone"])

    def run(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            sys.exit(f"error: unexpected arguments {argv[1:]}; overrides are --config.<field>=<v>.")
        config_file, overrides = command.config_flag_overrides(config)
        train = command.train_command(config_file, workdir.value, overrides, python=python.value)
        gcloud = ssh_command(
            tpu=tpu.value,
            zone=zone.value,
            project=project.value,
            code_dir=code_dir.value,
            train=train,
        )
        if dry_run.value:
            print(shlex.join(gcloud))
            return
        try:
            sys.exit(subprocess.run(gcloud, check=False).returncode)
        except FileNotFoundError:
            sys.exit("error: gcloud not found; install the Google Cloud CLI or use --dry_run.")

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
