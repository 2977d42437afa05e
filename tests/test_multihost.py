"""Multi-process runs: 2 processes x 4 CPU devices, joined by jax.distributed, equal 1 x 8 devices."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest

from cnn_lab import load_run
from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import mlp_digits
from cnn_lab.launch import local
from cnn_lab.metric_writer import read_metrics
from cnn_lab.runtime import distributed
from cnn_lab.train import train_and_evaluate

ROOT = Path(__file__).parents[1]
# Both processes must finish well within this; a hung one (its peer died) is killed.
TIMEOUT_SECONDS = 240


def _config(data_dir: str):
    config = mlp_digits.get_config("smoke")  # 4 steps per epoch, 2 epochs; dropout on.
    config.data.data_dir = data_dir
    config.data.input_mode = "device"
    return config


def _launch(*args: str) -> subprocess.CompletedProcess:
    """python -m launch.local <args> in its own process group, killed whole on timeout."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.local", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = launcher.communicate(timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        out, _ = launcher.communicate()
        pytest.fail(f"2-process run did not finish in {TIMEOUT_SECONDS} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process workdir, two-process workdir, the launcher's output)."""
    root = tmp_path_factory.mktemp("multihost")
    data_dir = str(root / "tfds")
    train_and_evaluate(_config(data_dir), root / "one")  # 8 devices (conftest); prepares digits.
    two = _launch(
        "--num_processes=2",
        "--cpu_devices_per_process=4",
        "--",
        "--config=configs/mlp_digits.py:smoke",
        f"--workdir={root / 'two'}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.input_mode=device",
    )
    assert two.returncode == 0, two.stdout[-3000:]
    return root / "one", root / "two", two.stdout


@pytest.mark.slow
def test_two_processes_of_four_devices_train_like_one_of_eight(runs):
    one, two, _ = runs
    provenance = json.loads((two / "config.json").read_text())["provenance"]
    assert (provenance["process_count"], provenance["device_count"]) == (2, 8)
    _, params_one, _ = load_run(one, "latest")
    _, params_two, _ = load_run(two, "latest")  # Written by 2 processes, read by 1.
    chex.assert_trees_all_close(params_two, params_one, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_only_process_zero_writes_metrics_and_logs(runs):
    one, two, output = runs
    records_one, records_two = read_metrics(one), read_metrics(two)
    assert [(r["step"], r["split"]) for r in records_two] == [
        (r["step"], r["split"]) for r in records_one
    ]
    test = [r for r in records_two if r["split"] == "test"]
    assert test[0]["count"] == 256  # Every test example counted once over both processes.
    lines = output.splitlines()
    assert any(line.startswith("[0] epoch 2/2") for line in lines)
    assert not any(line.startswith("[1] epoch") or line.startswith("[1] test:") for line in lines)


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    _, two, _ = runs
    workdir = tmp_path / "resumed"
    shutil.copytree(two, workdir)
    config = _config(json.loads((two / "config.json").read_text())["config"]["data"]["data_dir"])
    # The whole train state restores at its last step (nothing left to train) and evaluates
    # the test split in one process as the two processes did.
    results = train_and_evaluate(config, workdir)
    test = next(r for r in read_metrics(two) if r["split"] == "test")
    assert results["test"]["count"] == test["count"] == 256
    assert results["test"]["loss"] == pytest.approx(test["loss"], rel=1e-5)
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "val"] == [4, 8]


@pytest.mark.slow
def test_launcher_stops_every_process_when_one_fails():
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    failing = [sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"]
    start = time.monotonic()
    assert local.run([sleeper, failing], dict(os.environ)) == 3
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_a_locked_workdir_stops_every_process_at_once(tmp_path):
    """Process 0 is refused the lock: process 1 stops too, quoting it, rather than waiting for
    process 0 at its first collective (started without the launcher, which would kill it)."""
    commands = local.commands(
        2,
        local.free_port(),
        ["--config=configs/mlp_digits.py:smoke", f"--workdir={tmp_path / 'run'}"],
    )
    env = local.process_env(dict(os.environ), cpu_devices=4)
    with workdir_lib.locked(tmp_path / "run"):
        processes = [
            subprocess.Popen(c, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
            for c in commands
        ]
        errors = [p.communicate(timeout=TIMEOUT_SECONDS)[1] for p in processes]
    for process, stderr in zip(processes, errors, strict=True):
        assert process.returncode == 1, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert "is in use by another training run" in stderr, stderr[-3000:]
    assert "Process 0 of this run could not start" in errors[1]


def test_launcher_dry_run_prints_one_command_per_process(capsys):
    assert (
        local.main(
            [
                "--num_processes=2",
                "--cpu_devices_per_process=4",
                "--dry_run",
                "--",
                "--config=configs/lenet_digits.py",
                "--workdir=w",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    port = lines[0].split("--coordinator_address=127.0.0.1:")[1].split()[0]
    for i, line in enumerate(lines):
        assert "--xla_force_host_platform_device_count=4" in line
        assert f"--coordinator_address=127.0.0.1:{port} --num_processes=2 --process_id={i}" in line
        assert "-m cnn_lab.train --config=configs/lenet_digits.py --workdir=w" in line


def test_partial_multi_process_flags_are_a_clear_error():
    with pytest.raises(ValueError, match=r"--process_id=None: a multi-process run needs all three"):
        distributed.initialize("127.0.0.1:1234", 2, None)
    with pytest.raises(ValueError, match=r"--process_id=2 is not in \[0, --num_processes=2\)"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


@pytest.mark.parametrize(("tasks", "expected"), [("2", "slurm"), ("1", None)])
def test_a_multi_task_srun_step_is_detected(monkeypatch, tasks, expected):
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node1", SLURM_PROCID="0")
    for name, value in {**slurm, "SLURM_NTASKS": tasks}.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == expected
