"""A bad config value, workdir or flag is one clear error, raised before the workdir is written."""

import os
from pathlib import Path

import pytest

from cnn_lab import command_line, user_input
from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import lenet_digits
from cnn_lab.train import train_and_evaluate

SMOKE = ["--config=configs/lenet_digits.py:smoke"]


def _smoke(**overrides):
    config = lenet_digits.get_config("smoke")
    for field, value in overrides.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


def _assert_untouched(workdir: Path) -> None:
    """Nothing was written: no config.json, checkpoints, best/ or metrics."""
    assert not workdir.exists() or not list(workdir.iterdir()), list(workdir.iterdir())


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("train.batch_size", -8, "--config.train.batch_size=128"),
        ("train.batch_size", 0, "--config.train.batch_size=128"),
        ("eval.batch_size", 0, "--config.eval.batch_size=512"),
        ("train.log_every_steps", 0, "--config.train.log_every_steps=50"),
        ("train.num_epochs", 0, "--config.train.num_epochs=30"),
        ("train.grad_accumulation_steps", 0, "--config.train.grad_accumulation_steps=1"),
        ("checkpoint.keep", 0, "--config.checkpoint.keep=3"),
        ("checkpoint.every_steps", -1, "--config.checkpoint.every_steps=0"),
        ("train.early_stopping_patience", 0, "--config.train.early_stopping_patience=5"),
    ],
)
def test_bad_count_names_field_value_and_valid_one(tmp_path, field, value, valid):
    with pytest.raises(ValueError, match=rf"config\.{field}={value} is invalid") as error:
        train_and_evaluate(_smoke(**{field: value}), tmp_path)
    assert valid in str(error.value)
    _assert_untouched(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("optimizer.name", "rmsprop", r"Unknown optimizer 'rmsprop'.*optimizer\.name=sgd"),
        ("schedule.name", "linear", r"Unknown schedule 'linear'.*schedule\.name=cosine"),
        ("model.name", "lenet7", r"Unknown model 'lenet7'"),
        ("averaging.select", "ema", r"averaging\.select='ema'"),
        ("data.name", "cifar11", r"Unknown data set 'cifar11'.*cifar10"),
        ("model.num_classes", 7, r"has 10 classes.*num_classes=10"),
        ("augment.flip", True, r"augment\.flip=True.*flip=False"),
        ("augment.random_erasing", 2.0, r"random_erasing=2\.0 is the probability.*=0\.5"),
        ("data.mean", (0.5, 0.5, 0.5), r"data\.channels=1.*mean has 3 values"),
        ("train.grad_accumulation_steps", 3, r"grad_accumulation_steps=3 must divide"),
    ],
)
def test_bad_value_is_refused_before_writing(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(_smoke(**{field: value}), tmp_path)
    _assert_untouched(tmp_path)


def test_unprepared_data_set_is_refused_before_writing(tmp_path):
    config = _smoke(**{"data.name": "cifar10", "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    with pytest.raises(ValueError, match=rf"{workdir} is a file, not a directory"):
        train_and_evaluate(_smoke(), workdir)
    with pytest.raises(ValueError, match=rf"{workdir} is a file"):
        user_input.check_workdir(workdir / "below")


def test_read_only_workdir_is_refused(tmp_path, monkeypatch):
    # Tests run as root, for whom chmod does not make a directory read-only.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path} is read-only.*writable"):
        train_and_evaluate(_smoke(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_changed_config_is_refused_before_writing(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "16").mkdir(parents=True)
    workdir_lib.write_config(workdir, _smoke(), provenance={})
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate: 0\.002 -> 0\.02"):
        train_and_evaluate(_smoke(**{"optimizer.learning_rate": 0.02}), workdir)
    # The workdir's lock file, taken before the check (it holds nothing once released), aside.
    after = [p.relative_to(workdir) for p in workdir.rglob("*") if p.name != workdir_lib.LOCK_FILE]
    assert sorted(after) == before


# --- The command line: one `error:` paragraph, exit status 1, no traceback, no thread noise. ---


def _assert_clean_error(result, *expected: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "cannot schedule new futures" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--config.optimzer.learning_rate=0.1"],
            ["--config.optimzer.learning_rate", "'optimzer'", '"optimizer"'],
        ),
        (
            ["--config.optimizer.learnig_rate=0.1"],
            ["--config.optimizer.learnig_rate", "'learnig_rate'", '"learning_rate"'],
        ),
        (["--config.train.batch_size=-8"], ["config.train.batch_size=-8", "batch_size=128"]),
        (["--config.train.batch_size=0"], ["config.train.batch_size=0", "batch_size=128"]),
        (["--config.train.log_every_steps=0"], ["log_every_steps=0", "log_every_steps=50"]),
        (["--config.checkpoint.keep=0"], ["checkpoint.keep=0", "checkpoint.keep=3"]),
        (["--config.data.name=cifar11"], ["Unknown data set 'cifar11'"]),
    ],
)
def test_command_line_mistake_is_one_error_line(launch, tmp_path, args, expected):
    workdir = tmp_path / "run"
    result = launch("cnn_lab.train", *SMOKE, *args, f"--workdir={workdir}")
    _assert_clean_error(result, *expected)
    assert not workdir.exists()


@pytest.mark.slow
def test_unprepared_data_set_leaves_no_thread_noise(launch, tmp_path):
    workdir = tmp_path / "run"
    result = launch(
        "cnn_lab.train",
        *SMOKE,
        "--config.data.name=cifar10",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--workdir={workdir}",
    )
    _assert_clean_error(result, "'cifar10' is not prepared")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # No TFDS log lines.
    assert not workdir.exists()


@pytest.mark.slow
def test_missing_config_file_is_one_error_line(launch, tmp_path):
    result = launch("cnn_lab.train", "--config=configs/nope.py", f"--workdir={tmp_path / 'run'}")
    _assert_clean_error(result, "--config=configs/nope.py", "No such file", "configs/lenet_")


@pytest.mark.slow
def test_workdir_that_is_a_file_is_one_error_line(launch, tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    result = launch("cnn_lab.train", *SMOKE, f"--workdir={workdir}")
    _assert_clean_error(result, f"{workdir} is a file", "--workdir")


@pytest.mark.slow
def test_verbose_shows_the_traceback(launch, tmp_path, monkeypatch):
    monkeypatch.setenv(command_line.VERBOSE_ENV, "1")
    result = launch(
        "cnn_lab.train", *SMOKE, "--config.checkpoint.keep=0", f"--workdir={tmp_path / 'run'}"
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "checkpoint.keep=0" in result.stderr


@pytest.mark.slow
def test_evaluate_mistake_is_one_error_line(launch, tmp_path):
    result = launch("cnn_lab.tools.evaluate", f"--workdir={tmp_path}", "--splt=test")
    _assert_clean_error(result, "'splt'", "split")
