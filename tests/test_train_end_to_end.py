"""End to end: the train command on digits, the workdir it leaves, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnn_lab.configs import convnet_digits, lenet_digits, mlp_digits
from cnn_lab.metric_writer import read_metrics
from cnn_lab.train import train_and_evaluate


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _smoke(get_config, data_dir):
    config = get_config("smoke")
    config.data.data_dir = data_dir
    return config


def test_smoke_run_writes_the_workdir_contract(tmp_path, digits_dir):
    results = train_and_evaluate(_smoke(lenet_digits.get_config, digits_dir), tmp_path)
    assert results["test"]["count"] == 256  # every example of test[:256], none dropped
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["config"]["model"]["name"] == "lenet5"
    assert run["provenance"]["device_count"] == 8
    assert run["provenance"]["versions"]["jax"]
    records = read_metrics(tmp_path)
    assert {r["split"] for r in records} == {"train", "val", "test"}
    for r in records:
        assert {"step", "epoch", "split", "loss", "accuracy"} <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0
    assert [r["step"] for r in records if r["split"] == "val"] == [4, 8]  # 512 // 128 per epoch
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    curves = np.asarray(Image.open(tmp_path / "curves.png").convert("L"))
    assert curves.std() > 0
    assert (tmp_path / "checkpoints" / "8").is_dir()


@pytest.mark.parametrize("get_config", [convnet_digits.get_config, mlp_digits.get_config])
def test_other_digits_configs_run(tmp_path, digits_dir, get_config):
    results = train_and_evaluate(_smoke(get_config, digits_dir), tmp_path)
    assert np.isfinite(results["val"]["loss"])


@pytest.mark.slow
def test_lenet_learns_digits(tmp_path, digits_dir):
    config = lenet_digits.get_config()
    config.data.data_dir = digits_dir
    config.train.num_epochs = 8
    config.train.progress_bar = False
    results = train_and_evaluate(config, tmp_path)
    assert results["test"]["count"] == 450
    assert results["test"]["accuracy"] > 0.93


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "cnn_lab.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_overrides_reach_the_run(tmp_path, digits_dir):
    root = lenet_digits.__file__.rsplit("/configs/", 1)[0]
    out = _cli(
        "--config=configs/lenet_digits.py:smoke",
        f"--workdir={tmp_path}",
        f"--config.data.data_dir={digits_dir}",
        "--config.optimizer.learning_rate=0.0123",
        "--config.train.num_epochs=1",
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads((tmp_path / "config.json").read_text())
    assert run["config"]["optimizer"]["learning_rate"] == 0.0123
    assert "test: loss" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.optimizer.learning_rat=0.1", "learning_rat"),
        ("--config.optimizer.learning_rate=fast", "learning_rate"),
    ],
)
def test_cli_rejects_bad_overrides(tmp_path, override, message):
    root = lenet_digits.__file__.rsplit("/configs/", 1)[0]
    out = _cli("--config=configs/lenet_digits.py", f"--workdir={tmp_path}", override, cwd=root)
    assert out.returncode != 0
    assert message in out.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_wrong_num_classes_is_a_clear_error(tmp_path, digits_dir):
    config = _smoke(lenet_digits.get_config, digits_dir)
    config.model.num_classes = 7
    with pytest.raises(ValueError, match=r"has 10 classes.*num_classes=10"):
        train_and_evaluate(config, tmp_path)


def test_unknown_model_lists_known_names(tmp_path, digits_dir):
    config = _smoke(lenet_digits.get_config, digits_dir)
    config.model.name = "lenet7"
    with pytest.raises(ValueError, match=r"Unknown model 'lenet7'.*lenet5"):
        train_and_evaluate(config, tmp_path)


def test_early_stopping_ends_training_then_tests_and_a_rerun_goes_straight_to_test(
    tmp_path, digits_dir, capsys
):
    # A learning rate of 0: validation never improves on the first epoch's.
    config = _smoke(mlp_digits.get_config, digits_dir)
    config.train.num_epochs, config.train.early_stopping_patience = 5, 1
    config.optimizer.learning_rate = 0.0
    first = train_and_evaluate(config, tmp_path)
    assert "Early stopping: no validation gain for 1 epochs" in capsys.readouterr().out
    val = [r["step"] for r in read_metrics(tmp_path) if r["split"] == "val"]
    assert val == [4, 8]  # Epoch 2 had no gain on epoch 1: the run stopped there.
    again = train_and_evaluate(config, tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["split"] == "val"] == val  # No epoch retrained.
    assert [r["step"] for r in records if r["split"] == "test"] == [8]  # Rewritten, not twice.
    assert again["test"] == first["test"]
