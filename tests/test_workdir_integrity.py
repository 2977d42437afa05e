"""Preemption at any moment, and damage that stays finite: each ends in a clear message and a
rerun that completes as if nothing happened.

The workdir-integrity scenarios live beside the mechanism each one tests: the lock in
test_workdir_lock.py; fresh starts, torn metrics lines and config.json in test_fresh_start.py;
bad values, flags and workdirs in test_config_validation.py; damaged, truncated and
non-finite checkpoints, SIGKILL (once and 20 times) and SIGTERM mid-epoch in
test_checkpoint.py. This module holds SIGTERM at each moment of a run, and a damaged best/.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import cnn_lab
from cnn_lab import checkpoint, checkpoint_policy, evaluation, metric_writer
from cnn_lab import workdir as workdir_lib
from cnn_lab.checkpoint_policy import Preempted
from cnn_lab.configs import lenet_digits
from cnn_lab.data import inputs, loading
from cnn_lab.train import PREEMPTED_EXIT_CODE, train_and_evaluate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    loading.num_classes("digits", data_dir=path)
    return path


def _config(data_dir):
    """The smoke LeNet: 2 epochs of 16 steps, checkpoints every 4 steps."""
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.train.batch_size = 32
    config.train.num_epochs = 2
    config.checkpoint.every_steps = 4
    return config


def _params(workdir):
    return jax.device_get(cnn_lab.load_run(workdir, "latest")[1]["params"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_and_evaluate(_config(data_dir), workdir)
    return workdir


def _sigterm_then(function):
    """`function`, sending this process a real SIGTERM first (the run's handler must catch it)."""

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


def _sigterm_on_split(split):
    original = evaluation.SideBySide.__call__

    def call(self, state, step, which, *args, **kwargs):
        if which == split:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, state, step, which, *args, **kwargs)

    return call


def _sigterm_at_step(target):
    original = metric_writer.TrainWindow.add

    def add(self, metrics):
        if self.first_step + len(self.pending) + 1 == target:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, metrics)

    return add


# Each moment: what to patch so that SIGTERM arrives then, the step saved, and the message.
MOMENTS = {
    "set-up": (
        (inputs, "make_inputs", lambda: _sigterm_then(inputs.make_inputs)),
        0,
        "during set-up, before any training step",
    ),
    "mid-epoch": (
        (metric_writer.TrainWindow, "add", lambda: _sigterm_at_step(6)),
        6,
        "saved a checkpoint at step 6",
    ),
    "a save": (
        (
            checkpoint_policy.CheckpointPolicy,
            "save_latest",
            lambda: _sigterm_then(checkpoint_policy.CheckpointPolicy.save_latest),
        ),
        5,  # The save at step 4 completes; the run stops after the next step.
        "saved a checkpoint at step 5",
    ),
    "validation": (
        (evaluation.SideBySide, "__call__", lambda: _sigterm_on_split("val")),
        16,
        "saved a checkpoint at step 16",
    ),
    "the final test": (
        (evaluation.SideBySide, "__call__", lambda: _sigterm_on_split("test")),
        32,
        "during the test evaluation",
    ),
}


@pytest.mark.slow  # Ten short runs.
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_sigterm_at_any_moment_stops_preempted_and_the_rerun_is_bitwise_exact(
    tmp_path, data_dir, uninterrupted, monkeypatch, moment
):
    (owner, name, make), saved, message = MOMENTS[moment]
    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(owner, name, make())
        with pytest.raises(Preempted, match=message) as preempted:
            train_and_evaluate(_config(data_dir), workdir)
    assert preempted.value.step == saved
    steps = checkpoint.has_steps(workdir / checkpoint.LATEST_DIR)
    assert steps == (saved > 0)
    if saved:
        assert cnn_lab.load_run(workdir, "latest")[1]["params"]
    records = workdir_lib.read_metrics(workdir)
    assert not [r for r in records if r["split"] == "test"]  # The rerun writes the one test line.

    results = train_and_evaluate(_config(data_dir), workdir)
    assert results["test"]["count"] > 0
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, _params(workdir), _params(uninterrupted)))
    assert leaves and all(leaves)


def test_sigterm_during_set_up_stops_before_training(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(inputs, "make_inputs", _sigterm_then(inputs.make_inputs))
    with pytest.raises(Preempted, match="during set-up, before any training step; rerun"):
        train_and_evaluate(_config(data_dir), tmp_path / "run")
    assert not checkpoint.has_steps(tmp_path / "run" / checkpoint.LATEST_DIR)
    assert workdir_lib.holder(tmp_path / "run") is None  # The lock went with the run.


def test_sigterm_during_the_imports_exits_preempted(tmp_path, repo_root, launch_env):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnn_lab.train",
            "--config=configs/lenet_digits.py:smoke",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=repo_root,
        env=launch_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # Importing jax, flax and TensorFlow takes seconds.
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("resumed_at", "advice"), [(16, "suspect"), (0, "learning_rate")])
def test_non_finite_first_step_after_a_resume_blames_the_checkpoint(tmp_path, resumed_at, advice):
    writer = metric_writer.MetricWriter(tmp_path, enabled=False)
    window = metric_writer.TrainWindow(writer, 32, 16, resumed_at, is_lead=True)
    window.add({"loss": np.float32(np.nan), "grad_norm": np.float32(1.0)})
    with pytest.raises(FloatingPointError, match=advice) as error:
        window.write(resumed_at + 1)
    assert f"step {resumed_at + 1}" in str(error.value)
    if resumed_at:
        assert f"{checkpoint.LATEST_DIR}/{resumed_at} into" in str(error.value)
        assert "learning_rate" not in str(error.value)


def _flip_bytes_of_data_files(step_dir: Path) -> None:
    """XOR one byte in every 512 of each array data file of the step (Orbax spreads parameters
    and optimizer state over several, in no fixed order): values that may stay finite."""
    data_files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        data = bytearray(path.read_bytes())
        for i in range(256, len(data), 512):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))


def test_a_damaged_best_step_is_refused_by_load_run_and_evaluate(tmp_path, uninterrupted):
    workdir = Path(tmp_path / "run")
    subprocess.run(["cp", "-r", str(uninterrupted), str(workdir)], check=True)
    (best_step,) = [p for p in (workdir / checkpoint.BEST_DIR).iterdir() if p.name.isdigit()]
    _flip_bytes_of_data_files(best_step)
    with (
        pytest.warns(UserWarning, match=f"step {best_step.name}"),
        pytest.raises(checkpoint.CheckpointError, match="--checkpoint=latest"),
    ):
        cnn_lab.load_run(workdir, "best")
    assert best_step.exists()  # Readers move nothing.
    _, variables, _ = cnn_lab.load_run(workdir, "latest")  # The other copy still serves.
    assert variables["params"]
