"""The sweep report, from workdir files alone: groups, mean +- std, unfinished runs, errors."""

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_lab import sweep
from cnn_lab.launch import command
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


def _finished_run(sweep_dir, overrides, test, epoch_seconds, evaluations=()):
    """A finished run: val records with epoch_seconds (epoch 1 twice: resumed), a test record."""
    name = sweep.workdir_name(overrides)
    seconds = [
        (1.0, 99.0),
        (1.0, epoch_seconds[0]),
        *zip((2.0, 3.0), epoch_seconds[1:], strict=True),
    ]
    records = [
        {"step": 10, "epoch": epoch, "split": "val", "accuracy": 0.5, "epoch_seconds": s}
        for epoch, s in seconds
    ]
    records.append({"step": 30, "epoch": 3.0, "split": "test", "parameters": 1000, **test})
    (sweep_dir / name).mkdir(parents=True)
    (sweep_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for file, content in evaluations:
        (sweep_dir / name / file).write_text(json.dumps(content))
    sweep.update_index(sweep_dir, name, overrides, "done")
    return name


@pytest.fixture
def fashion_sweeps(tmp_path):
    """Two sweeps as launch.sweep and cnn_lab.evaluate leave them, and their config files."""
    config = tmp_path / "resnet_fmnist.py"
    config.write_text(
        "def get_report():\n"
        "    return {'published': {'': 'any depth', 'model.depth=56': 'deep',\n"
        "        'model.depth=56,model.stochastic_depth_rate=0.5': 'deep, dropped'}}\n"
    )
    resnet = tmp_path / "runs" / "resnet56"
    resnet.mkdir(parents=True)
    points = sweep.product(sweep.axis("model.stochastic_depth_rate", [0.0, 0.5]), sweep.seeds(3))
    spec = {"config": str(config), "base": {"model.depth": 56}, "points": points}
    (resnet / sweep.SPEC_FILE).write_text(json.dumps(spec))
    names = []
    for i, point in enumerate(points):
        test = {"accuracy": 0.90 + i / 100, "ema_accuracy": 0.91 + i / 100}
        test |= {"polyak_accuracy": 0.92 + i / 200}
        snapshot = {"model": "snapshots(5)", "accuracy": 0.95 + i / 1000}
        evaluations = [
            ("eval_latest_test.json", {"rows": [{"model": "raw"}, snapshot]}),
            ("eval_best_test.json", {"rows": [{"model": "raw"}]}),  # Newer, no snapshots.
        ]
        names.append(_finished_run(resnet, point, test, (10.0 + i, 20.0, 30.0), evaluations))
    ensemble = {"workdirs": [str(resnet / n) for n in names[:3]], "rows": []}
    ensemble["rows"] = [{"model": "raw"}, {"model": "ensemble(3)", "accuracy": 0.97}]
    (resnet / names[0] / "ensemble_best_test.json").write_text(json.dumps(ensemble))
    plain = tmp_path / "runs" / "mlp"
    plain.mkdir()
    (plain / sweep.SPEC_FILE).write_text(json.dumps({"config": "gone.py", "points": []}))
    _finished_run(plain, {"seed": 0}, {"accuracy": 0.88}, (5.0, 5.0, 5.0))
    (plain / "seed=1").mkdir()  # Still training: counted, not averaged.
    sweep.update_index(plain, "seed=1", {"seed": 1}, "running")
    return [resnet, plain]


def test_results_table_has_a_row_per_point_with_seeds_averaging_and_ensembles(fashion_sweeps):
    from cnn_lab.tools import results

    (fashion_sweeps[0].parent / "results.md").write_text("an earlier table")  # Skipped.
    glob = sorted(fashion_sweeps[0].parent.iterdir(), key=lambda p: p.name != "resnet56")
    paths = results.write_results(glob, fashion_sweeps[0].parent / "results")
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["sweep"], r["point"]) for r in rows] == [
        ("resnet56", "model.depth=56, model.stochastic_depth_rate=0.0"),
        ("resnet56", "model.depth=56, model.stochastic_depth_rate=0.0: snapshots(5)"),
        (
            "resnet56",
            "model.depth=56, model.stochastic_depth_rate=0.0: ensemble(3) of seeds 0, 1, 2",
        ),
        ("resnet56", "model.depth=56, model.stochastic_depth_rate=0.5"),
        ("resnet56", "model.depth=56, model.stochastic_depth_rate=0.5: snapshots(5)"),
        ("mlp", "-"),
    ]
    first, snapshots, ensemble, dropped, _, plain = rows
    assert first["config"] == "resnet_fmnist" and first["parameters"] == "1000"
    assert (first["finished"], first["runs"]) == ("3", "3")
    assert float(first["test_accuracy"]) == pytest.approx(0.91)
    assert float(first["test_accuracy_std"]) == pytest.approx(statistics.stdev([0.9, 0.91, 0.92]))
    assert float(dropped["test_accuracy"]) == pytest.approx(0.94)
    assert float(first["ema_accuracy"]) == pytest.approx(0.92)
    assert float(dropped["polyak_accuracy"]) == pytest.approx(0.92 + 4 / 200)
    # The last record of each epoch counts (the resumed epoch 1 once): 10 + 20 + 30, 11 + ..;
    # the fastest seed's time stands for the point.
    assert float(first["wall_seconds"]) == pytest.approx(60.0)
    assert float(dropped["wall_seconds"]) == pytest.approx(63.0)
    assert float(snapshots["test_accuracy"]) == pytest.approx(0.951)
    assert float(ensemble["test_accuracy"]) == 0.97 and ensemble["test_accuracy_std"] == ""
    assert ensemble["parameters"] == "3000" and float(ensemble["wall_seconds"]) == 183.0
    assert [first["published"], dropped["published"], plain["published"]] == [
        "deep",
        "deep, dropped",
        "",
    ]
    assert plain["ema_accuracy"] == "" and float(plain["test_accuracy"]) == 0.88
    markdown = paths["md"].read_text()
    assert "| 0.9100 +- 0.0100 (n=3) | 0.9200 | 0.9250 | 1.0 min | deep |" in markdown
    assert "| mlp | `gone` | - | 1,000 | 0.8800 (n=1 of 2) | - | - | 0.2 min | - |" in markdown


def test_results_replace_the_readme_between_the_markers(fashion_sweeps, tmp_path, capsys):
    from cnn_lab.tools import results

    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n{results.BEGIN}\nold table\n{results.END}\nafter\n")
    out = tmp_path / "table"
    report.main([*map(str, fashion_sweeps), f"--readme={readme}", f"--out={out}"])
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{results.END}\nafter\n")
    assert (
        text.split(results.BEGIN)[1].split(results.END)[0]
        == "\n" + (out.with_suffix(".md")).read_text()
    )
    readme.write_text("# Results, no markers\n")
    with pytest.raises(SystemExit, match="results:begin"):
        report.main([*map(str, fashion_sweeps), f"--readme={readme}"])
    assert readme.read_text() == "# Results, no markers\n"
    with pytest.raises(SystemExit, match="launch\\.sweep"):
        report.main([str(fashion_sweeps[0]), str(tmp_path)])


def test_published_figures_match_the_most_specific_conditions():
    from cnn_lab.tools import results

    published = {"": "all", "model.depth=56": "deep", "model.depth=56,seed=1": "one"}
    assert results.published_text(published, {"model.depth": 20}) == "all"
    assert results.published_text(published, {"model.depth": 56, "seed": 0}) == "deep"
    assert results.published_text(published, {"model.depth": 56, "seed": 1}) == "one"
    assert results.published_text("same for all", {"model.depth": 20}) == "same for all"


def test_the_readme_table_is_rewritten_by_the_results_command_it_shows():
    from cnn_lab.launch import fashion_mnist_results
    from cnn_lab.tools import results

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert 0 <= readme.find(results.BEGIN) < readme.find(results.END)
    assert "\npython -m launch.fashion_mnist_results\n" in readme
    report = fashion_mnist_results.report_command(Path("runs"), "README.md", dry_run=True)
    assert report[-1] == "--readme=README.md"
    assert len(set(report)) == len(report)  # A sweep grown by two steps is reported once.
    # Every Fashion-MNIST config has a step, and every step's sweep applies to its config.
    steps = " ".join(" ".join(args) for _, args in fashion_mnist_results.STEPS)
    for config in sorted((root / "configs").glob("*_fashion_mnist.py")):
        assert f"--config=configs/{config.name}" in steps, config.name
    for _, args in fashion_mnist_results.STEPS:
        if "launch.sweep" in args:
            config = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
            overrides = dict(
                a.removeprefix("--config.").split("=", 1) for a in args if a.startswith("--config.")
            )
            command.check_overrides(str(root / config), overrides)
    with pytest.raises(ValueError, match="--only=lenet names no step"):
        fashion_mnist_results.commands(Path("runs"), ["lenet"])


def test_an_ensemble_is_evaluated_right_after_its_sweep_finishes(tmp_path, capsys):
    from cnn_lab.launch import fashion_mnist_results

    (tmp_path / "resnet20").mkdir()
    for seed in range(3):
        sweep.update_index(tmp_path / "resnet20", f"seed={seed}", {"seed": seed}, "done")
    fashion_mnist_results.main([f"--runs_dir={tmp_path}", "--dry_run", "--readme="])
    lines = [line.split(" ", 3)[-1] for line in capsys.readouterr().out.splitlines()]
    sweep_line = lines.index(next(x for x in lines if x.endswith(f"={tmp_path / 'resnet20'}")))
    assert lines[sweep_line + 1].startswith("cnn_lab.evaluate --checkpoint=latest --ensemble ")
    assert lines[sweep_line + 1].endswith(
        " ".join(str(tmp_path / "resnet20" / f"seed={s}") for s in range(3))
    )
    assert "launch.sweep --config=configs/alexnet_fashion_mnist.py" in lines[sweep_line + 2]
    assert (
        sum("cnn_lab.evaluate" in line for line in lines) == 1
    )  # The snapshots' sweep is not done.
    (tmp_path / "resnet20" / "seed=0").mkdir()
    (tmp_path / "resnet20" / "seed=0" / "ensemble_latest_test.json").write_text("{}")
    fashion_mnist_results.main([f"--runs_dir={tmp_path}", "--dry_run", "--readme="])
    assert "cnn_lab.evaluate" not in capsys.readouterr().out  # Its record exists: done.


def test_records_copied_off_a_sweep_give_its_report_and_are_never_overwritten(
    sweep_dir, tmp_path_factory
):
    records, restored = tmp_path_factory.mktemp("records"), tmp_path_factory.mktemp("runs")
    first = sweep_dir / sweep.workdir_name({"model.depth": 56, "optimizer.name": "sgd", "seed": 0})
    (first / "checkpoints").mkdir()
    (first / "checkpoints" / "state").write_bytes(b"\0" * 1000)
    (first / "eval_latest_test.json").write_text('{"rows": []}\n')

    assert len(sweep.copy_records(sweep_dir, records)) == 11  # Not the unfinished run.
    assert not (records / first.name / "checkpoints").exists()
    assert (records / first.name / "eval_latest_test.json").exists()

    def table(directory):
        return json.dumps(report.tables(report.load_runs(directory, "test_accuracy")))

    assert table(records) == table(sweep_dir)  # The unfinished run is listed, as in its sweep.
    # A rerun's changed metrics never replace a record; a new evaluation file joins it.
    kept = sweep.final_metrics(records / first.name)
    _run(sweep_dir, {"model.depth": 57, "seed": 0}, 0.5)
    (first / "metrics.jsonl").write_text((first / "metrics.jsonl").read_text() * 2)
    (first / "ensemble_latest_test.json").write_text('{"rows": []}\n')
    assert sweep.copy_records(sweep_dir, records) == [first.name, "model.depth=57,seed=0"]
    assert sweep.final_metrics(records / first.name) == kept
    assert (records / first.name / "ensemble_latest_test.json").exists()
    # Copied back onto a new machine, the records mark their runs finished: a sweep skips them.
    sweep.copy_records(records, restored)
    finished = [r["workdir"] for r in sweep.read_index(restored) if r["status"] == "done"]
    assert len(finished) == 12 and all(sweep.final_metrics(restored / n) for n in finished)


def test_the_results_launcher_restores_records_before_a_step_and_keeps_them_after(
    tmp_path, monkeypatch
):
    from cnn_lab.launch import fashion_mnist_results

    trained, report_lines = [], []

    def fake_run(line, *, dry_run, processes):
        """Trains seed 0 of the step's sweep unless it has finished; records the report line."""
        if "cnn_lab.report" in line:
            report_lines.append(line)
            return True
        runs = Path(line[-1].split("=", 1)[1])
        runs.mkdir(parents=True, exist_ok=True)
        if sweep.final_metrics(runs / "seed=0") is None:
            trained.append(runs)
            _run(runs, {"seed": 0}, 0.9)
        return True

    monkeypatch.setattr(fashion_mnist_results, "_run", fake_run)
    records = tmp_path / "records"
    for machine in ("first", "second"):  # The second starts with an empty runs directory.
        fashion_mnist_results.main(
            [f"--runs_dir={tmp_path / machine}", f"--records_dir={records}", "--only=lenet5"]
        )
    assert trained == [tmp_path / "first" / "lenet5"]
    assert sweep.final_metrics(records / "lenet5" / "seed=0")["test_accuracy"] == 0.9
    assert str(records / "lenet5") in report_lines[-1]


def test_the_kept_results_table_is_what_the_kept_records_give(tmp_path):
    # results.md is the report of results/fashion_mnist/, so its every figure can be
    # regenerated from a clean clone; a record edited or a table hand-written breaks this.
    from cnn_lab.launch import fashion_mnist_results

    records = Path(__file__).resolve().parents[1] / "results" / "fashion_mnist"
    command = fashion_mnist_results.report_command(records, "", dry_run=False)
    command[-1] = f"--out={tmp_path / 'results'}"
    subprocess.run(command, check=True, capture_output=True)
    kept = (records / "results.md").read_text()
    assert (tmp_path / "results.md").read_text() == kept
    assert kept.count("\n| ") >= len(list(records.glob("*/runs.csv")))  # A row per sweep.


def test_the_readme_table_is_the_kept_results_table():
    # README's table is the report's output (`launch.fashion_mnist_results --report_only`),
    # so a number typed into README, or records landed without rewriting it, fails here.
    from cnn_lab.tools import results

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme[readme.index(results.BEGIN) + len(results.BEGIN) + 1 : readme.index(results.END)]
    assert block == (root / "results" / "fashion_mnist" / "results.md").read_text()
