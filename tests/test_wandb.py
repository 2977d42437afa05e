"""Weights & Biases logging (config.logging.wandb_project), run offline: the config, metrics
and curves reach one W&B run per workdir, which a resumed training continues; only an enabled
writer (process 0) logs; a missing wandb package is one error line before the workdir exists."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import pytest

from cnn_lab import checkpoint, checkpoint_policy
from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import mlp_digits
from cnn_lab.metric_writer import MetricWriter
from cnn_lab.train import train_and_evaluate

_NEEDS_WANDB = "the wandb extra is not installed (pip install 'cnn_lab[wandb]')"


def _config(overrides: dict | None = None):
    """mlp_digits:smoke logging to W&B, with {"section.field": value} overrides."""
    config = mlp_digits.get_config("smoke")
    config.logging.wandb_project = "cnn_lab_test"
    for field, value in (overrides or {}).items():
        section, name = field.split(".")
        config[section][name] = value
    return config


def test_a_missing_wandb_is_one_error_line_and_touches_nothing(tmp_path, launch_env, repo_root):
    workdir = tmp_path / "run"
    hide_wandb = "import sys; sys.modules['wandb'] = None; from cnn_lab.train import main; main()"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            hide_wandb,
            "--config=configs/mlp_digits.py:smoke",
            f"--workdir={workdir}",
            "--config.logging.wandb_project=demo",
        ],
        cwd=repo_root,
        env=launch_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config.logging.wandb_project='demo'")
    assert "pip install 'cnn_lab[wandb]'" in lines[0]
    assert not workdir.exists()


def test_only_an_enabled_writer_logs_to_wandb(tmp_path):
    MetricWriter(tmp_path, enabled=False, config=_config())
    assert not (tmp_path / workdir_lib.WANDB_DIR).exists()
    assert not (tmp_path / workdir_lib.WANDB_RUN_FILE).exists()


def test_a_fresh_start_moves_the_wandb_run_aside(tmp_path):
    for name in (workdir_lib.WANDB_RUN_FILE, f"{workdir_lib.WANDB_DIR}/offline-run-1-abc/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("abc\n")
    latest = checkpoint.make_manager(tmp_path / checkpoint.LATEST_DIR, 2)
    moved_to = checkpoint_policy.move_previous_attempt(tmp_path, latest)
    latest.close()
    assert (moved_to / workdir_lib.WANDB_RUN_FILE).read_text() == "abc\n"
    assert not (tmp_path / workdir_lib.WANDB_RUN_FILE).exists()  # The next run starts anew.
    assert not (tmp_path / workdir_lib.WANDB_DIR).exists()


def _records(path: Path):
    """The protobuf records of a W&B transaction log (run-<id>.wandb): 32 KiB blocks of
    chunks, each a 7-byte header (CRC-32, length, kind: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    position, payload = 7, b""  # After the file header (":W&B", magic, version).
    while position + 7 <= len(data):
        if block - position % block < 7:  # A block's tail too short for a header is padding.
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 or position + 7 + length > len(data):  # The end, or a chunk half-written.
            break
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def _finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a finished run's log: W&B's service may still be writing it after
    `wandb.finish()` returns, so wait for its last record, "exit"."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_records(path))
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _wandb_runs(workdir: Path) -> list[dict]:
    """Per process that logged (oldest first): its run id, config and history rows by step."""
    runs = []
    for path in sorted((workdir / workdir_lib.WANDB_DIR).glob("offline-run-*/run-*.wandb")):
        run = {"id": path.stem.removeprefix("run-"), "config": {}, "history": {}}
        for record in _finished_records(path):
            if record.HasField("config"):
                run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
            if record.HasField("history"):
                row = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                run["history"][int(row["_step"])] = {k: json.loads(v) for k, v in row.items()}
        runs.append(run)
    return runs


@pytest.fixture
def offline_wandb(monkeypatch):
    """wandb in offline mode, its run finished after the test (as process exit would)."""
    wandb = pytest.importorskip("wandb", reason=_NEEDS_WANDB)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield wandb
    wandb.finish()


def test_a_run_logs_config_metrics_and_curves_and_resumes_the_same_wandb_run(
    tmp_path, offline_wandb, prepare_digits, tiny_run
):
    data_dir = tmp_path / "tfds"
    prepare_digits(data_dir)
    fields = tiny_run | {"data.data_dir": str(data_dir), "train.num_epochs": 2}
    workdir = tmp_path / "run"
    train_and_evaluate(_config(fields), workdir)
    run_id = (workdir / workdir_lib.WANDB_RUN_FILE).read_text().strip()
    longer = _config(fields | {"train.num_epochs": 3})
    train_and_evaluate(longer, workdir, allow_config_changes=("train.num_epochs",))
    offline_wandb.finish()

    first, resumed = _wandb_runs(workdir)
    assert first["id"] == resumed["id"] == run_id
    assert first["config"]["train"]["num_epochs"] == 2
    assert resumed["config"]["train"]["num_epochs"] == 3
    assert first["config"]["logging"]["wandb_project"] == "cnn_lab_test"
    assert max(first["history"]) < min(resumed["history"])  # It continues, in step order.
    history = first["history"] | resumed["history"]
    for record in workdir_lib.read_metrics(workdir):
        row = history[record["step"]]
        assert row[f"{record['split']}/loss"] == pytest.approx(record["loss"])
        assert row[f"{record['split']}/accuracy"] == pytest.approx(record["accuracy"])
    last = history[max(history)]
    assert "test/accuracy" in last and last["curves/_type"] == "image-file"
    media = list((workdir / workdir_lib.WANDB_DIR).glob("offline-run-*/files/media/images/*.png"))
    assert len(media) >= 3  # The curves after each epoch and after the test.


def test_runs_from_before_wandb_resume_and_may_switch_it_on(tmp_path):
    saved = mlp_digits.get_config().to_dict()
    del saved["logging"]
    workdir_lib.write_config(tmp_path, ml_collections.ConfigDict(saved), provenance={})
    workdir_lib.check_resumable(tmp_path, mlp_digits.get_config())
    switched_on = mlp_digits.get_config()
    switched_on.logging.wandb_project = "cnn_lab_test"
    workdir_lib.check_resumable(tmp_path, switched_on)
