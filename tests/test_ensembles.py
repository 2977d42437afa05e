"""Averages and snapshots in a real run, resumed exactly; the evaluation table and ensembles."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from cnn_lab import checkpoint, optim, saved_run
from cnn_lab.configs import convnet_digits, lenet_digits
from cnn_lab.metric_writer import read_metrics
from cnn_lab.tools import evaluate
from cnn_lab.train import train_and_evaluate

ROOT = Path(lenet_digits.__file__).parents[1]


def _averaged_snapshot_config(data_dir: str) -> ml_collections.ConfigDict:
    """LeNet smoke run (4 steps per epoch, 2 epochs) with EMA, Polyak and 2 LR cycles."""
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.averaging.ema_decay = 0.9
    config.averaging.polyak_start_epoch = 1.0
    config.averaging.select = "ema"
    config.schedule.name = "cyclic_cosine"
    config.schedule.cycles = 2
    config.schedule.warmup_epochs = 0.0
    config.checkpoint.keep = 1
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    averaged = tmp_path_factory.mktemp("averaged")
    train_and_evaluate(_averaged_snapshot_config(data_dir), averaged)
    plain = tmp_path_factory.mktemp("convnet")
    config = convnet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    train_and_evaluate(config, plain)
    return data_dir, averaged, plain


def test_cyclic_cosine_restarts_at_each_cycle_end():
    config = ml_collections.ConfigDict(dict(name="cyclic_cosine", warmup_epochs=0.0, cycles=4))
    schedule = optim.make_schedule(config, 0.1, steps_per_epoch=10, total_steps=100)
    ends = optim.cycle_ends(config, steps_per_epoch=10, total_steps=100)
    assert ends == [25, 50, 75, 100]
    rates = np.array([float(schedule(s)) for s in range(100)])
    for start in (0, 25, 50, 75):
        assert rates[start] == pytest.approx(0.1)  # restarted
        assert np.all(np.diff(rates[start : start + 25]) < 0)  # then decaying
        assert rates[start + 24] < 0.002


def test_validation_reports_every_average_side_by_side(runs):
    _, averaged, _ = runs
    records = read_metrics(averaged)
    for split in ("val", "test"):
        for r in (r for r in records if r["split"] == split):
            assert {"accuracy", "ema_accuracy", "polyak_accuracy", "ema_loss"} <= set(r)
    # select="ema": the best checkpoint is the epoch of the best EMA validation accuracy.
    val = [r for r in records if r["split"] == "val"]
    best_epoch = 1 + int(np.argmax([r["ema_accuracy"] for r in val]))
    assert checkpoint.make_manager(averaged / checkpoint.BEST_DIR, read_only=True).all_steps() == [
        4 * best_epoch
    ]


def test_snapshots_are_kept_beyond_keep_last(runs):
    _, averaged, _ = runs
    assert saved_run.open_run(averaged).snapshot_steps() == [4, 8]
    assert sorted(int(p.name) for p in (averaged / checkpoint.LATEST_DIR).iterdir()) == [8]


def test_resume_restores_the_averages_and_retakes_a_lost_snapshot(runs, tmp_path):
    data_dir, averaged, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(averaged, resumed)
    # Back to step 4, the first cycle's end, as if killed before its snapshot was written.
    shutil.rmtree(resumed / checkpoint.LATEST_DIR / "8")
    shutil.rmtree(resumed / checkpoint.BEST_DIR, ignore_errors=True)
    shutil.move(resumed / checkpoint.SNAPSHOT_DIR / "4", resumed / checkpoint.LATEST_DIR / "4")
    shutil.rmtree(resumed / checkpoint.SNAPSHOT_DIR / "8")
    train_and_evaluate(_averaged_snapshot_config(data_dir), resumed)
    assert saved_run.open_run(resumed).snapshot_steps() == [4, 8]
    for average in ("raw", "ema", "polyak"):
        for name in ("latest", "snapshot:4", "snapshot:8"):
            _, a, _ = saved_run.load_run(averaged, name, average)
            _, b, _ = saved_run.load_run(resumed, name, average)
            assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
    _, ema, _ = saved_run.load_run(averaged, "latest", "ema")
    _, raw, _ = saved_run.load_run(averaged, "latest")
    assert not np.array_equal(
        ema["params"]["Dense_2"]["kernel"], raw["params"]["Dense_2"]["kernel"]
    )


def test_evaluation_rows_and_an_ensemble_of_one_model(runs):
    _, averaged, _ = runs
    rows, log_probs, labels = evaluate.evaluate_run(averaged, "latest", "test")
    models = [r["model"] for r in rows]
    # digits: no flip TTA (a mirrored digit changes meaning); LeNet: no dropout to sample.
    assert models == ["raw", "ema", "polyak", "snapshots(2)", "tta:crops"]
    snapshot_row = rows[3]
    assert snapshot_row["members"] == 2 and len(snapshot_row["member_accuracies"]) == 2
    # The latest checkpoint is the last snapshot: the raw row is that member's accuracy.
    assert snapshot_row["member_accuracies"][1] == pytest.approx(rows[0]["accuracy"])
    one = evaluate.ensemble_row([averaged, averaged], [log_probs, log_probs], [labels, labels])
    for key in ("accuracy", "nll", "ece"):
        assert one[key] == pytest.approx(rows[0][key], abs=1e-6)
    assert one["disagreement"] == 0.0
    again, _, _ = evaluate.evaluate_run(averaged, "latest", "test")
    assert again == rows  # deterministic (and now read back from the prediction cache)
    with pytest.raises(ValueError, match="other examples"):
        evaluate.ensemble_row([averaged, averaged], [log_probs, log_probs], [labels, labels[:-1]])


@pytest.mark.slow
def test_cli_ensemble_table_and_json(runs):
    _, averaged, plain = runs
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnn_lab.evaluate",
            "--ensemble",
            "--checkpoint=latest",
            str(averaged),
            str(plain),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for model in ("raw", "ema", "snapshots(2)", "tta:crops", "tta:mc_dropout", "ensemble(2)"):
        assert model in out.stdout
    written = json.loads((averaged / "ensemble_latest_test.json").read_text())
    ensemble = written["rows"][-1]
    raw = [r for r in written["rows"] if r["model"] == "raw"]
    assert ensemble["member_accuracies"] == pytest.approx([r["accuracy"] for r in raw])
    assert 0.0 <= ensemble["disagreement"] <= 1.0
    assert list((plain / evaluate.PREDICTIONS_DIR).glob("test-latest@8-mc_dropout-*.npy"))


def test_evaluation_opens_the_run_once_for_every_average_and_snapshot(runs, monkeypatch):
    _, averaged, _ = runs
    calls = {"read_config": 0, "get_model": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        saved_run.workdir_lib,
        "read_config",
        counted("read_config", saved_run.workdir_lib.read_config),
    )
    monkeypatch.setattr(saved_run, "get_model", counted("get_model", saved_run.get_model))
    rows, _, _ = evaluate.evaluate_run(averaged, "latest", "test", ("ema", "polyak", "snapshots"))
    assert [r["model"] for r in rows] == ["ema", "polyak", "snapshots(2)"]
    assert calls == {"read_config": 1, "get_model": 1}
