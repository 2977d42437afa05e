"""Running the launchers as users do: `python -m launch.<name>` from the repository root."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A few steps of the MLP on slices of digits: each run takes a few seconds.
TINY_RUN = {
    "train.num_epochs": 1,
    "model.hidden_sizes": (32,),
    "data.train_split": "train[:256]",
    "data.validation_split": "train[-128:]",
    "data.test_split": "test[:128]",
    "eval.batch_size": 128,
}


def prepare_digits(data_dir: Path) -> None:
    """Prepare digits in `data_dir` and decode TINY_RUN's splits once, not in every run."""
    from cnn_lab.data import pipeline
    from configs import mlp_digits

    data = mlp_digits.get_config("smoke").data
    data.update({k.removeprefix("data."): v for k, v in TINY_RUN.items() if k.startswith("data.")})
    data.data_dir = str(data_dir)
    for split in (data.train_split, data.validation_split, data.test_split):
        pipeline.load(data, split)


def env() -> dict[str, str]:
    """The test environment for launched processes (and SLURM jobs, which inherit it).

    The code under test comes first on PYTHONPATH; the runs use one CPU device, not the
    eight the in-process tests simulate: they are single-process runs and start faster.
    """
    variables = dict(os.environ)
    variables["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    variables["XLA_FLAGS"] = variables.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"
    )
    return variables


def launch(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def require_slurm() -> None:
    """Skip, saying why, unless a SLURM cluster started by .ci/slurm_cluster.sh is up."""
    if not os.environ.get("SLURM_CONF"):
        pytest.skip(
            "no test SLURM cluster: SLURM_CONF is unset (.ci/run starts one with "
            ".ci/slurm_cluster.sh when slurmctld, slurmd and munge are installed)"
        )
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM_CONF is set but sbatch is not installed")
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if "idle" not in state.stdout and "mix" not in state.stdout:
        pytest.skip(f"the SLURM cluster of {os.environ['SLURM_CONF']} has no usable node: {state}")
