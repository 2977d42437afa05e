"""Workdir integrity: a fresh start moves the earlier attempt aside; a torn last metrics line
is dropped on resume; a damaged or missing config.json is a clear error."""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import cnn_lab
from cnn_lab import checkpoint, checkpoint_policy, saved_run, sweep
from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import lenet_digits
from cnn_lab.data import loading
from cnn_lab.metric_writer import read_metrics
from cnn_lab.tools import evaluate, inspect_run
from cnn_lab.train import train_and_evaluate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    loading.num_classes("digits", data_dir=path)
    return path


def _config(data_dir, num_epochs=2, learning_rate=None):
    """The smoke LeNet: 16 steps per epoch, checkpoints every 4 steps, the newest 2 kept."""
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.train.batch_size = 32
    config.train.num_epochs = num_epochs
    config.checkpoint.every_steps = 4
    config.checkpoint.keep = 2
    if learning_rate is not None:
        config.optimizer.learning_rate = learning_rate
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A finished 2-epoch run; tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(_config(data_dir), workdir)
    return workdir


@pytest.fixture
def workdir(tmp_path, trained):
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_fresh_start_moves_the_earlier_attempt_aside_and_best_is_the_new_runs(
    workdir, data_dir, capsys
):
    old_best, old_best_step = saved_run.open_run(workdir).restore("best")
    for f in (workdir / checkpoint.LATEST_DIR).rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with (
        pytest.warns(UserWarning, match="moved it"),
        pytest.raises(checkpoint.CheckpointError, match="None of the checkpoint steps"),
    ):
        train_and_evaluate(_config(data_dir), workdir)
    capsys.readouterr()

    results = train_and_evaluate(_config(data_dir, num_epochs=1, learning_rate=0.02), workdir)

    assert _steps(workdir / checkpoint.BEST_DIR) == [16]
    best, best_step = saved_run.open_run(workdir).restore("best")
    assert best_step == 16
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, best, old_best)))
    assert cnn_lab.load_run(workdir, "best")[2].optimizer.learning_rate == 0.02
    records = read_metrics(workdir)
    assert max(r["step"] for r in records) == 16
    assert records[-1]["split"] == "test"
    assert records[-1]["accuracy"] == results["test"]["accuracy"]

    (previous,) = (workdir / workdir_lib.PREVIOUS_DIR).iterdir()
    assert (
        f"Starting from scratch: moved the earlier outputs in {workdir}" in capsys.readouterr().out
    )
    assert {"best", "config.json", "metrics.jsonl", "tensorboard", "curves.png"} <= {
        p.name for p in previous.iterdir()
    }
    assert _steps(previous / checkpoint.BEST_DIR) == [old_best_step]
    assert (workdir / checkpoint.BROKEN_DIR).is_dir()  # The quarantine stays where it was named.


def test_move_previous_attempt_moves_run_outputs_only(tmp_path):
    for name in ("best/7", "predictions", "inspect", "broken_checkpoints/checkpoints-3-1"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("eval_best_test.json", "ensemble_best_test.json", "metrics.jsonl", "train.log"):
        (tmp_path / name).write_text("{}\n")
    latest = checkpoint.make_manager(tmp_path / checkpoint.LATEST_DIR)  # Empty: not moved.

    previous = checkpoint_policy.move_previous_attempt(tmp_path, latest)

    assert sorted(p.name for p in previous.iterdir()) == [
        "best",
        "ensemble_best_test.json",
        "eval_best_test.json",
        "inspect",
        "metrics.jsonl",
        "predictions",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken_checkpoints",
        "checkpoints",
        "previous",
        "train.log",
    ]
    assert (
        checkpoint_policy.move_previous_attempt(tmp_path, latest) is None
    )  # Nothing left to move.
    latest.close()
    # The tools' output folders are the ones a fresh start moves.
    assert evaluate.PREDICTIONS_DIR in checkpoint_policy.RUN_OUTPUTS
    assert inspect_run.INSPECT_DIR in checkpoint_policy.RUN_OUTPUTS


def test_torn_last_metrics_line_is_dropped_on_resume(workdir, data_dir):
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 33, "epoch": 2.06, "split": "tra')  # A write cut short.

    with pytest.warns(UserWarning, match=r"last line of .*metrics\.jsonl .*cut short"):
        results = train_and_evaluate(
            _config(data_dir, num_epochs=3), workdir, allow_config_changes=("train.num_epochs",)
        )

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # Every line whole again.
    assert [r["step"] for r in records if r["split"] == "val"] == [16, 32, 48]
    assert records[-1]["split"] == "test"
    assert records[-1]["accuracy"] == results["test"]["accuracy"]


def test_a_resumed_run_keeps_the_provenance_of_each_earlier_attempt(workdir, data_dir):
    # A run continued under another commit, machine or XLA flags must still say what
    # produced its first steps: each resume files the provenance before it under "earlier".
    def provenance():
        return json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())["provenance"]

    first = provenance()
    assert "resumed_at" not in first and "earlier" not in first
    for epochs in (3, 4):
        config = _config(data_dir, num_epochs=epochs)
        train_and_evaluate(config, workdir, allow_config_changes=("train.num_epochs",))
    last = provenance()
    assert last["resumed_at"] == 48
    assert [p.get("resumed_at") for p in last["earlier"]] == [None, 32]
    assert last["earlier"][0] == first


def test_damaged_metrics_line_before_the_last_is_an_error_naming_the_file(workdir, data_dir):
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:10]
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))} is damaged: line 2 .*Delete or repair"
    ):
        train_and_evaluate(_config(data_dir), workdir)
    assert path.read_text().splitlines() == lines  # Left as it was, for the user to repair.


def test_corrupt_config_json_is_an_error_naming_the_file(workdir, data_dir):
    path = workdir / "config.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is damaged .*Restore it"):
        train_and_evaluate(_config(data_dir), workdir)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is damaged"):
        cnn_lab.load_run(workdir)


def test_deleted_config_json_with_checkpoints_is_refused(workdir, data_dir):
    (workdir / "config.json").unlink()
    steps = _steps(workdir / checkpoint.LATEST_DIR)
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing.*cannot check"):
        train_and_evaluate(_config(data_dir, learning_rate=0.02), workdir)
    assert _steps(workdir / checkpoint.LATEST_DIR) == steps
    assert not (workdir / workdir_lib.PREVIOUS_DIR).exists()


# Runs trained by earlier versions of cnn_lab: the Fashion-MNIST records kept in the repository.
OLDER_RUNS = sorted(Path(cnn_lab.__file__).parents[1].glob("results/fashion_mnist/*/seed=*"))


@pytest.mark.parametrize("run", OLDER_RUNS, ids=lambda run: f"{run.parent.name}/{run.name}")
def test_a_config_saved_by_an_older_cnn_lab_reads_back_with_every_field_of_today(run, repo_root):
    config_file = json.loads((run.parent / "sweep.json").read_text())["config"]
    today = sweep.config_module(str(repo_root / config_file)).get_config()
    saved = workdir_lib.read_config(run)
    fields = set(workdir_lib.flatten(today.to_dict()))
    # A field missing from ADDED_FIELDS would make resuming such a run a config change.
    assert fields - set(workdir_lib.flatten(saved.to_dict())) == set()
