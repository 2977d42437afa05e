"""The sweep report, from workdir files alone: groups, mean +- std, unfinished runs, errors."""

import csv
import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnn_lab import sweep
from cnn_lab.tools import report


def _run(sweep_dir, overrides, accuracy):
    """A workdir as training leaves it: metrics.jsonl (test record only if it finished)."""
    name = sweep.workdir_name(overrides)
    records = [{"step": 10, "epoch": 1.0, "split": "val", "loss": 1.0, "accuracy": 0.5}]
    if accuracy is not None:
        records.append(
            {"step": 10, "epoch": 1.0, "split": "test", "loss": 0.3, "accuracy": accuracy}
        )
    (sweep_dir / name).mkdir()
    (sweep_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sweep.update_index(sweep_dir, name, overrides, "done" if accuracy is not None else "failed")


@pytest.fixture
def sweep_dir(tmp_path):
    """depth {20, 56} x optimizer {sgd, adam} x seeds {0, 1, 2}; one run never finished."""
    rng = np.random.default_rng(0)
    points = sweep.product(
        sweep.axis("model.depth", [56, 20]),
        sweep.axis("optimizer.name", ["sgd", "adam"]),
        sweep.seeds(3),
    )
    for point in points:
        unfinished = point == {"model.depth": 20, "optimizer.name": "adam", "seed": 2}
        _run(tmp_path, point, None if unfinished else float(rng.uniform(0.8, 1.0)))
    return tmp_path


def _accuracy(sweep_dir, **fields):
    values = []
    for row in sweep.read_index(sweep_dir):
        if all(row["overrides"][k] == v for k, v in fields.items()):
            values.append(
                (sweep.final_metrics(sweep_dir / row["workdir"]) or {}).get("test_accuracy")
            )
    return [v for v in values if v is not None], len(values)


def test_report_tables_per_point_and_per_axis_value(sweep_dir):
    paths = report.write_report(sweep_dir, "test_accuracy")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["scope"] for r in rows] == ["point"] * 4 + ["axis model.depth"] * 2 + [
        "axis optimizer.name"
    ] * 2
    for row in rows:
        fields = {}
        if row["model.depth"]:
            fields["model.depth"] = int(row["model.depth"])
        if row["optimizer.name"]:
            fields["optimizer.name"] = row["optimizer.name"]
        values, runs = _accuracy(sweep_dir, **fields)
        assert (int(row["finished"]), int(row["runs"])) == (len(values), runs)
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values))
    markdown = paths["md"].read_text()
    assert "| 20 | adam | 2/3 |" in markdown  # the unfinished run is counted, not averaged
    assert "| 56 | sgd | 3/3 |" in markdown
    assert "## model.depth" in markdown and "## optimizer.name" in markdown
    image = np.asarray(Image.open(paths["png"]).convert("L"))
    assert image.shape[1] > image.shape[0] and image.std() > 0  # two panels side by side


def test_axes_exclude_the_seed_and_fields_that_never_change(tmp_path):
    for seed in range(2):
        _run(tmp_path, {"model.depth": 20, "train.num_epochs": 3, "seed": seed}, 0.9 + seed / 100)
    runs = report.load_runs(tmp_path, "test_accuracy")
    assert report.axes_of(runs) == ["model.depth", "train.num_epochs"]  # none varies: keep all
    one = report.summarise([0.9, math.nan])
    assert (one["runs"], one["finished"], one["mean"]) == (2, 1, 0.9) and math.isnan(one["std"])


@pytest.mark.slow
def test_report_command_errors_name_the_fix(tmp_path, sweep_dir, launch):
    def command(*args):
        return launch("cnn_lab.report", *args)

    out = command(str(tmp_path / "nowhere"))
    assert out.returncode != 0 and "runs.csv" in out.stderr and "launch.sweep" in out.stderr
    out = command(str(sweep_dir), "--metric=test_acc")
    assert out.returncode != 0 and "test_accuracy" in out.stderr
    out = command(str(sweep_dir), "--metric=val_loss")
    assert out.returncode == 0 and (sweep_dir / "report_val_loss.png").exists()


def test_report_never_imports_training(launch_env):
    code = "import sys, cnn_lab.tools.report; print('cnn_lab.train' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=launch_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_points_whose_overrides_are_lists_of_dicts_are_grouped():
    from cnn_lab.tools import report

    head_only = ({"epochs": 60, "freeze": ("Conv_.*",)},)  # As sweep.read_index gives it.
    runs = [
        {"overrides": {"seed": s, "phases": phases}, "value": value}
        for s, (phases, value) in enumerate(
            [((), 0.8), ((), 0.9), (head_only, 0.7), (head_only, 0.75)]
        )
    ]
    points = [r for r in report.tables(runs) if r["scope"] == "point"]
    assert [p["runs"] for p in points] == [2, 2]
    assert [p["mean"] for p in points] == pytest.approx([0.85, 0.725])
    for run, label in zip(runs, ["scratch", "scratch", "head_only", "head_only"], strict=True):
        run["overrides"]["label"] = label
    points = [r for r in report.tables(runs) if r["scope"] == "point"]
    assert [(p["label"], p["mean"]) for p in points] == [
        ("scratch", pytest.approx(0.85)),
        ("head_only", pytest.approx(0.725)),
    ]
    assert all("phases" not in p for p in points)  # The label stands for the long value.
