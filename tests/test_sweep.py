"""Sweeps: override grids, and the local runner's workdirs, skips, resumes and runs.csv."""

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from cnn_lab import checkpoint, sweep
from cnn_lab import workdir as workdir_lib
from cnn_lab.launch import children
from cnn_lab.tools import report


def test_product_and_zip_build_override_dicts():
    depths, seeds = sweep.axis("model.depth", [20, 56]), sweep.seeds(2)
    assert sweep.product(depths, seeds) == [
        {"model.depth": 20, "seed": 0},
        {"model.depth": 20, "seed": 1},
        {"model.depth": 56, "seed": 0},
        {"model.depth": 56, "seed": 1},
    ]
    rates = sweep.axis("optimizer.learning_rate", [0.1, 0.05])
    assert sweep.zipped(depths, rates) == [
        {"model.depth": 20, "optimizer.learning_rate": 0.1},
        {"model.depth": 56, "optimizer.learning_rate": 0.05},
    ]
    with pytest.raises(ValueError, match="one length"):
        sweep.zipped(depths, seeds[:1])
    with pytest.raises(ValueError, match=r"model\.depth"):
        sweep.product(depths, depths)


def test_axis_text_parses_literals_and_strings():
    assert sweep.parse_axis("model.depth=20,56") == [{"model.depth": 20}, {"model.depth": 56}]
    assert sweep.parse_axis("data.mean=(0.5,),(0.3,)") == [
        {"data.mean": (0.5,)},
        {"data.mean": (0.3,)},
    ]
    assert sweep.parse_axis("optimizer.name=sgd,adam") == [
        {"optimizer.name": "sgd"},
        {"optimizer.name": "adam"},
    ]
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        sweep.parse_axis("model.depth")


def test_workdir_names_say_the_overrides_and_differ():
    points = sweep.product(sweep.parse_axis("data.mean=(0.5,),(0.3,)"), sweep.seeds(2))
    names = [sweep.workdir_name(p) for p in points]
    assert names[0] == "data.mean=_0.5,_,seed=0"
    assert len(set(names)) == len(points)
    assert all("/" not in name for name in names)


@pytest.mark.slow
def test_a_misspelled_axis_stops_the_sweep_before_any_run(tmp_path, launch):
    out = launch(
        "launch.sweep",
        "--config=configs/mlp_digits.py:smoke",
        f"--sweep_dir={tmp_path / 'sweep'}",
        "--axis=optimizer.learning_rte=0.1,0.2",
    )
    assert out.returncode != 0
    assert "the config has no field 'learning_rte'. Did you mean \"learning_rate\"" in out.stderr
    assert not (tmp_path / "sweep").exists()


GRID = ["--axis=optimizer.learning_rate=0.001,0.003", "--axis=model.dropout_rate=0.0,0.2"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, launch, prepare_digits, tiny_run):
    """A 2 x 2 grid x 2 seeds of tiny digits runs, two at a time."""
    root = tmp_path_factory.mktemp("sweep")
    data_dir = root / "tfds"
    prepare_digits(data_dir)
    args = [
        "--config=configs/mlp_digits.py:smoke",
        f"--sweep_dir={root / 'grid'}",
        *GRID,
        "--seeds=2",
        *sweep.override_flags(tiny_run | {"data.data_dir": str(data_dir)}),
    ]
    out = launch("launch.sweep", *args, "--parallel=2", timeout=900)  # ~45 s of CPU in all.
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "grid", args


@pytest.mark.slow
def test_local_sweep_trains_every_point_in_its_workdir(local_sweep):
    sweep_dir, _ = local_sweep
    points = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert len(points) == 8
    workdirs = sorted(p for p in sweep_dir.iterdir() if (p / "config.json").exists())
    assert [w.name for w in workdirs] == sorted(sweep.workdir_name(p) for p in points)
    for point, workdir in ((p, sweep_dir / sweep.workdir_name(p)) for p in points):
        trained = json.loads((workdir / "config.json").read_text())["config"]
        assert trained["optimizer"]["learning_rate"] == point["optimizer.learning_rate"]
        assert trained["model"]["dropout_rate"] == point["model.dropout_rate"]
        assert trained["seed"] == point["seed"]
        assert sweep.final_metrics(workdir) is not None
    rows = sweep.read_index(sweep_dir)
    assert {r["workdir"] for r in rows} == {w.name for w in workdirs}
    for row in rows:
        assert row["status"] == "done"
        assert (
            row["test_accuracy"] == sweep.final_metrics(sweep_dir / row["workdir"])["test_accuracy"]
        )


@pytest.mark.slow
def test_report_means_and_stds_match_the_runs(local_sweep, launch):
    sweep_dir, _ = local_sweep
    out = launch("cnn_lab.report", str(sweep_dir))
    assert out.returncode == 0, out.stderr
    accuracy = {}  # workdir -> the test accuracy its own metrics.jsonl holds
    for line in (sweep_dir / "runs.csv").read_text().splitlines()[1:]:
        name = next(csv.reader([line]))[0]
        records = [
            json.loads(r) for r in (sweep_dir / name / "metrics.jsonl").read_text().splitlines()
        ]
        accuracy[name] = next(r["accuracy"] for r in records if r["split"] == "test")
    with open(sweep_dir / "report_test_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    points = [r for r in rows if r["scope"] == "point"]
    assert len(points) == 4
    for row in rows:
        fields = {k: row[k] for k in ("optimizer.learning_rate", "model.dropout_rate") if row[k]}
        members = [
            value
            for name, value in accuracy.items()
            if all(f"{k}={v}" in name.split(",") for k, v in fields.items())
        ]
        assert int(row["finished"]) == len(members) == (2 if row["scope"] == "point" else 4)
        assert float(row["mean"]) == pytest.approx(statistics.fmean(members))
        assert float(row["std"]) == pytest.approx(statistics.stdev(members))
    markdown = (sweep_dir / "report_test_accuracy.md").read_text()
    assert markdown.count("| 2/2 |") == 4 and markdown.count("| 4/4 |") == 4
    assert (sweep_dir / "report_test_accuracy.png").stat().st_size > 10_000
    assert report.axes_of(report.load_runs(sweep_dir, "test_accuracy")) == [
        "optimizer.learning_rate",
        "model.dropout_rate",
    ]


@pytest.mark.slow
def test_rerun_skips_finished_points_and_resumes_an_interrupted_one(local_sweep, launch):
    sweep_dir, args = local_sweep
    logs = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.jsonl")}
    out = launch("launch.sweep", *args, "--parallel=2")
    assert out.returncode == 0, out.stderr
    assert "8 of 8 points finished; 0 to run." in out.stdout
    assert {p: p.stat().st_mtime_ns for p in logs} == logs  # Nothing trained, nothing written.

    # A run killed before its test evaluation: metrics without the final test record.
    interrupted = sweep_dir / sweep.workdir_name(
        {"optimizer.learning_rate": 0.003, "model.dropout_rate": 0.0, "seed": 1}
    )
    metrics = interrupted / "metrics.jsonl"
    kept = [r for r in metrics.read_text().splitlines() if json.loads(r)["split"] != "test"]
    metrics.write_text("\n".join(kept) + "\n")
    assert sweep.final_metrics(interrupted) is None
    out = launch("launch.sweep", *args, "--parallel=2")
    assert out.returncode == 0, out.stderr
    assert "7 of 8 points finished; 1 to run." in out.stdout
    assert "resuming at step" in (interrupted / "train.log").read_text()
    assert sweep.final_metrics(interrupted) is not None
    changed = [p for p, mtime in logs.items() if p.stat().st_mtime_ns != mtime]
    assert changed == [metrics]


def test_a_label_names_the_point_and_is_not_a_config_field():
    point = {"label": "head_only", "phases": ({"epochs": 3, "freeze": ("Conv_.*",)},), "seed": 1}
    assert sweep.workdir_name(point) == "label=head_only,seed=1"
    assert sweep.override_flags(point) == [
        "--config.phases=({'epochs': 3, 'freeze': ('Conv_.*',)},)",
        "--config.seed=1",
    ]


def test_final_metrics_reads_a_torn_last_line_as_an_unfinished_run(tmp_path):
    records = [
        {"step": 9, "epoch": 1.0, "split": "val", "accuracy": 0.9},
        {"step": 9, "epoch": 1.0, "split": "test", "accuracy": 0.8},
    ]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert sweep.final_metrics(tmp_path)["test_accuracy"] == 0.8
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    assert sweep.final_metrics(tmp_path) is None  # A kill mid-write: the test record is lost.
    (tmp_path / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl is damaged: line 1"):
        sweep.final_metrics(tmp_path)


def test_a_sigterm_reaches_the_running_child_and_starts_no_other():
    processes = children.Children()
    codes = []
    thread = threading.Thread(target=lambda: codes.append(processes.run(["sleep", "60"])))
    before = signal.getsignal(signal.SIGTERM)
    with processes.stopping_on_sigterm():
        thread.start()
        while not processes._running:  # The child has started.
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # This process stops, as a launcher would.
        thread.join(timeout=10)
    assert codes == [-signal.SIGTERM]  # sleep dies of the passed-on SIGTERM, not in 60 s.
    assert processes.run(["true"]) is None
    assert signal.getsignal(signal.SIGTERM) is before  # The block's handler is gone after it.


@pytest.mark.slow  # A sweep of two digits runs as processes: about 30 s.
def test_sigterm_to_a_sweep_stops_its_run_at_a_saved_step_and_starts_no_other(
    tmp_path, launch_env, repo_root, prepare_digits, tiny_run
):
    prepare_digits(tmp_path / "tfds")
    long_run = tiny_run | {"train.num_epochs": 1000, "data.data_dir": str(tmp_path / "tfds")}
    args = ["--config=configs/mlp_digits.py:smoke", f"--sweep_dir={tmp_path / 'sweep'}"]
    sweep_process = subprocess.Popen(
        [sys.executable, "-m", "launch.sweep", *args, "--seeds=2", *sweep.override_flags(long_run)],
        cwd=repo_root, env=launch_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = tmp_path / "sweep" / "seed=0"
    deadline = time.monotonic() + 240
    while (
        not (first / "metrics.jsonl").exists()
        or '"val"' not in (first / "metrics.jsonl").read_text()
    ):  # An epoch has ended, and with it a checkpoint.
        assert time.monotonic() < deadline and sweep_process.poll() is None
        time.sleep(0.2)
    sweep_process.send_signal(signal.SIGTERM)  # To the sweep alone, as `kill -TERM <pid>`.
    stdout, stderr = sweep_process.communicate(timeout=120)
    assert sweep_process.returncode == children.STOPPED_EXIT_CODE, stderr[-3000:]
    assert f"kill -TERM {sweep_process.pid}" in stdout and "Rerun the same command" in stderr
    assert workdir_lib.holder(first) is None  # Its train process has exited...
    assert checkpoint.has_steps(first / checkpoint.LATEST_DIR)  # ...at a saved step.
    status = {row["workdir"]: row["status"] for row in sweep.read_index(tmp_path / "sweep")}
    assert status == {"seed=0": "preempted", "seed=1": "pending"}
    assert not (tmp_path / "sweep" / "seed=1").exists()
