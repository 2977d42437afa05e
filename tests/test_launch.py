"""Launchers: the SLURM script and TPU command they build, and real jobs on a test cluster."""

import csv
import json

import pytest

from cnn_lab import sweep
from cnn_lab.launch import slurm, tpu


@pytest.mark.slow
def test_slurm_dry_run_prints_the_requested_job(launch, repo_root):
    out = launch(
        "launch.slurm",
        "--config=configs/lenet_digits.py",
        "--workdir=runs/big",
        "--nodes=2",
        "--gpus_per_node=4",
        "--process_per=gpu",
        "--cpus_per_task=8",
        "--time=04:00:00",
        "--partition=gpu",
        "--grace_seconds=600",
        "--sbatch=--account=lab",
        "--config.seed=3",
        "--config.data.mean=(0.5,)",
        "--dry_run",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in (
        "--nodes=2",
        "--ntasks-per-node=4",  # one process per GPU
        "--gpus-per-node=4",
        "--cpus-per-task=8",
        "--time=04:00:00",
        "--partition=gpu",
        "--requeue",
        "--signal=TERM@600",
        "--account=lab",
        f"--output={repo_root / 'runs/big'}/slurm-%j.out",
    ):
        assert f"#SBATCH {option}" in lines
    run = next(line for line in lines if line.startswith("srun "))
    assert "-m cnn_lab.train --config=configs/lenet_digits.py" in run
    assert "--config.seed=3" in run and "'--config.data.mean=(0.5,)'" in run
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out.stdout
    assert f'"$status" -eq {slurm.PREEMPTED_EXIT_CODE}' in out.stdout
    assert not (repo_root / "runs/big").exists()  # A dry run writes nothing.


def test_slurm_one_process_per_node_and_no_requeue():
    resources = slurm.Resources(nodes=3, gpus_per_node=8, process_per="node", requeue=False)
    script = slurm.sbatch_script(resources, "srun true", job_name="j", log="o")
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --no-requeue" in script and "scontrol requeue" not in script
    with pytest.raises(ValueError, match="gpus_per_node"):
        slurm.Resources(process_per="gpu")


@pytest.mark.slow
def test_slurm_refuses_a_misspelled_override_before_submitting(launch):
    out = launch(
        "launch.slurm", "--config=configs/lenet_digits.py", "--workdir=x", "--config.sed=1"
    )
    assert out.returncode != 0 and "sed" in out.stderr


@pytest.mark.slow
def test_tpu_dry_run_prints_the_gcloud_command(launch):
    out = launch(
        "launch.tpu",
        "--tpu=pod",
        "--zone=us-central2-b",
        "--project=lab",
        "--config=configs/resnet50_imagenet.py",
        "--workdir=/mnt/shared/r50",
        "--config.train.num_epochs=5",
        "--dry_run",
    )
    assert out.returncode == 0, out.stderr
    command = out.stdout.strip()
    assert command.startswith("gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b")
    assert "--project=lab --worker=all" in command
    assert "cd cnn_lab && python3 -m cnn_lab.train --config=configs/resnet50_imagenet.py" in command
    assert "--workdir=/mnt/shared/r50 --config.train.num_epochs=5" in command
    gcloud = tpu.ssh_command(
        tpu="pod", zone="z", project=None, code_dir="my code", train=["python3", "-V"]
    )
    assert gcloud[-2:] == ["--worker=all", "--command=cd 'my code' && python3 -V"]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory, slurm_cluster, prepare_digits):
    """Digits for the SLURM jobs; skips (saying why) first when no test cluster is up."""
    path = tmp_path_factory.mktemp("tfds")
    prepare_digits(path)
    return path


@pytest.mark.slow
def test_slurm_job_trains_a_digits_run(tmp_path, digits_dir, launch, tiny_run):
    workdir = tmp_path / "run"
    out = launch(
        "launch.slurm",
        "--config=configs/mlp_digits.py:smoke",
        f"--workdir={workdir}",
        "--cpus_per_task=1",
        "--time=00:10:00",
        "--wait",
        *sweep.override_flags(tiny_run | {"data.data_dir": str(digits_dir)}),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    job = out.stdout.split()[1].rstrip(":")
    log = (workdir / f"slurm-{job}.out").read_text()
    assert "test: loss" in log
    assert sweep.final_metrics(workdir)["test_count"] == 128
    assert json.loads((workdir / "config.json").read_text())["config"]["model"]["hidden_sizes"] == [
        32
    ]


@pytest.mark.slow
def test_slurm_job_array_runs_a_sweep_and_the_report_lists_every_point(
    tmp_path, digits_dir, launch, tiny_run
):
    sweep_dir = tmp_path / "grid"
    out = launch(
        "launch.sweep",
        "--config=configs/mlp_digits.py:smoke",
        f"--sweep_dir={sweep_dir}",
        "--axis=model.dropout_rate=0.0,0.2",
        "--slurm",
        "--cpus_per_task=1",
        "--time=00:10:00",
        "--wait",
        *sweep.override_flags(tiny_run | {"data.data_dir": str(digits_dir)}),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "#SBATCH --array=0,1" in (sweep_dir / "array.sbatch").read_text()
    assert len(list((sweep_dir / "slurm").glob("*_[01].out"))) == 2
    rows = sweep.read_index(sweep_dir)
    assert [r["status"] for r in rows] == ["done", "done"]
    out = launch("cnn_lab.report", str(sweep_dir))
    assert out.returncode == 0, out.stderr
    with open(sweep_dir / "report_test_accuracy.csv") as f:
        points = [r for r in csv.DictReader(f) if r["scope"] == "point"]
    assert [p["model.dropout_rate"] for p in points] == ["0.0", "0.2"]
    for point, row in zip(points, rows, strict=True):
        assert float(point["mean"]) == row["test_accuracy"]
