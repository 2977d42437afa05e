"""One run per workdir: the lock, its error, its release when the holder dies, readers and sweeps."""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cnn_lab
from cnn_lab import sweep
from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import mlp_digits
from cnn_lab.launch import children
from cnn_lab.launch import sweep as launch_sweep
from cnn_lab.tools.evaluate import evaluate_run
from cnn_lab.train import train_and_evaluate

HERE = f"PID {os.getpid()} on host {socket.gethostname()}"


def _tiny_config(tiny_run: dict, data_dir: Path):
    config = mlp_digits.get_config("smoke")
    for field, value in tiny_run.items():
        section, name = field.split(".")
        config[section][name] = value
    config.data.data_dir = str(data_dir)
    return config


def _wait_for_holder(workdir: Path, pid: int, process: subprocess.Popen) -> None:
    """Return once process `pid` holds `workdir`'s lock (fail if it exits first)."""
    deadline = time.monotonic() + 120
    while not (workdir_lib.holder(workdir) or "").startswith(f"PID {pid} "):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the process never took the workdir's lock"
        time.sleep(0.05)


def test_a_held_workdir_refuses_a_second_lock_naming_the_holder(tmp_path):
    assert workdir_lib.holder(tmp_path / "run") is None
    with workdir_lib.locked(tmp_path / "run"):
        assert workdir_lib.holder(tmp_path / "run") == HERE
        with (
            pytest.raises(workdir_lib.WorkdirBusy, match=HERE),
            workdir_lib.locked(tmp_path / "run"),
        ):
            pass
        assert workdir_lib.holder(tmp_path / "run") == HERE  # The refused attempt took nothing.
    assert workdir_lib.holder(tmp_path / "run") is None
    with workdir_lib.locked(tmp_path / "run"):  # Released on exit: the next run takes it.
        assert workdir_lib.holder(tmp_path / "run") == HERE


def test_a_file_system_without_locks_warns_and_trains_unguarded(tmp_path, monkeypatch):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.warns(UserWarning, match="cannot be locked"), workdir_lib.locked(tmp_path):
        assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == ""  # Claims no holder.


def test_train_on_a_locked_workdir_stops_before_writing_anything(tmp_path, tiny_run):
    workdir = tmp_path / "run"
    busy = pytest.raises(workdir_lib.WorkdirBusy, match=f"{HERE}.*another --workdir")
    with workdir_lib.locked(workdir), busy:
        train_and_evaluate(_tiny_config(tiny_run, tmp_path / "tfds"), workdir)
    assert [p.name for p in workdir.iterdir()] == [workdir_lib.LOCK_FILE]


def test_the_train_command_on_a_locked_workdir_prints_one_error_line(tmp_path, launch):
    workdir = tmp_path / "run"
    with workdir_lib.locked(workdir):
        out = launch(
            "cnn_lab.train", "--config=configs/mlp_digits.py:smoke", f"--workdir={workdir}"
        )
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: ") and HERE in out.stderr
    assert "Traceback" not in out.stderr
    assert [p.name for p in workdir.iterdir()] == [workdir_lib.LOCK_FILE]


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path, launch_env, repo_root):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom cnn_lab import workdir\n"
            "with workdir.locked(sys.argv[1]):\n    time.sleep(600)",
            str(workdir),
        ],
        cwd=repo_root,
        env=launch_env,
    )
    try:
        _wait_for_holder(workdir, holder.pid, holder)
        busy = pytest.raises(workdir_lib.WorkdirBusy, match=f"PID {holder.pid} on host")
        with busy, workdir_lib.locked(workdir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert workdir_lib.holder(workdir) is None  # Its lock file, left behind, blocks nothing.
    with workdir_lib.locked(workdir):
        assert workdir_lib.holder(workdir) == HERE


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, prepare_digits):
    path = tmp_path_factory.mktemp("tfds")
    prepare_digits(path)
    return path


@pytest.mark.slow
def test_a_killed_run_frees_its_workdir_for_the_rerun(
    tmp_path, data_dir, tiny_run, launch_env, repo_root
):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "cnn_lab.train",
        "--config=configs/mlp_digits.py:smoke",
        f"--workdir={workdir}",
        *sweep.override_flags(tiny_run | {"data.data_dir": str(data_dir)}),
    ]
    first = subprocess.Popen(
        command, cwd=repo_root, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_holder(workdir, first.pid, first)
        first.send_signal(signal.SIGSTOP)  # Paused, it keeps the lock while the rerun tries.
        with pytest.raises(workdir_lib.WorkdirBusy, match=f"PID {first.pid} on host"):
            train_and_evaluate(_tiny_config(tiny_run, data_dir), workdir)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    results = train_and_evaluate(_tiny_config(tiny_run, data_dir), workdir)
    assert sweep.final_metrics(workdir)["test_accuracy"] == pytest.approx(
        results["test"]["accuracy"]
    )
    assert workdir_lib.holder(workdir) is None  # The finished run let go of it.


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir, tiny_run):
    workdir = tmp_path_factory.mktemp("finished")
    results = train_and_evaluate(_tiny_config(tiny_run, data_dir), workdir)
    return workdir, results


@pytest.mark.slow
def test_a_locked_run_can_be_evaluated_and_loaded(finished_run):
    workdir, results = finished_run
    with workdir_lib.locked(workdir):
        rows, _, _ = evaluate_run(workdir, "latest", "test", ("raw",))
        _, variables, config = cnn_lab.load_run(workdir, "best")
        assert workdir_lib.holder(workdir) == HERE  # Reading took no lock and freed none.
    assert rows[0]["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert config.model.hidden_sizes == (32,) and "params" in variables


def _sweep_args(sweep_dir: Path) -> list[str]:
    return ["--config=configs/mlp_digits.py:smoke", f"--sweep_dir={sweep_dir}", "--seeds=1"]


def test_a_sweep_reports_a_locked_point_as_running_and_does_not_relaunch_it(tmp_path, launch):
    sweep_dir = tmp_path / "sweep"
    workdir = sweep_dir / sweep.workdir_name({"seed": 0})
    with workdir_lib.locked(workdir):
        out = launch("launch.sweep", *_sweep_args(sweep_dir))
        assert out.returncode == 0, out.stderr[-3000:]
        assert "0 of 1 points finished; 0 to run." in out.stdout
        assert f"still running, not relaunched: seed=0 ({HERE})" in out.stdout
        (row,) = sweep.read_index(sweep_dir)
        assert (row["workdir"], row["status"]) == ("seed=0", "running")
        assert [p.name for p in workdir.iterdir()] == [workdir_lib.LOCK_FILE]  # No train.log.

        # A point that locks between the sweep's look and its launch (a SLURM array task).
        spec = launch_sweep.read_spec(sweep_dir)
        sweep.update_index(sweep_dir, "seed=0", {"seed": 0}, "failed", "1")
        processes = children.Children()
        status = launch_sweep.run_point(
            sweep_dir, spec, 0, python=sys.executable, srun=False, processes=processes
        )
        assert status == "running"
        assert sweep.read_index(sweep_dir)[0]["status"] == "running"
        assert [p.name for p in workdir.iterdir()] == [workdir_lib.LOCK_FILE]
