"""The depth ablation config: its sweep, its parameter counts in the summary, and its report
(parameters dropped and accuracy change against the full net, the lecture's column)."""

import json

import pytest

from cnn_lab import sweep
from cnn_lab import workdir as workdir_lib
from cnn_lab.configs import alexnet_depth_ablation
from cnn_lab.tools import report, summary

CONFIG_FILE = alexnet_depth_ablation.__file__


def test_the_sweep_is_the_five_lecture_variants_times_three_seeds():
    points = alexnet_depth_ablation.get_sweep()
    assert len(points) == 15 and {p["seed"] for p in points} == {0, 1, 2}
    removals = {p["label"]: p["model.remove"] for p in points}
    assert removals == {
        "full": (),
        "-fc7": ("fc7",),
        "-fc6-fc7": ("fc6", "fc7"),
        "-conv3-conv4": ("conv3", "conv4"),
        "-conv3-conv4-fc6-fc7": ("conv3", "conv4", "fc6", "fc7"),
    }
    assert len({sweep.workdir_name(p) for p in points}) == 15


def test_summary_lists_each_variant_once_with_its_parameters():
    config = alexnet_depth_ablation.get_config()
    text = summary.summarize_sweep(config, alexnet_depth_ablation.get_sweep())
    lines = text.splitlines()[1:]
    assert [line.split()[0] for line in lines] == list(alexnet_depth_ablation.VARIANTS)
    # The compact net at 32x32 grey, 10 classes, counted by hand (k*k*c_in*c_out + c_out):
    convs = [5 * 5 * 1 * 32 + 32, 5 * 5 * 32 * 96 + 96, 9 * 96 * 192 + 192]
    convs += [9 * 192 * 128 + 128, 9 * 128 * 128 + 128]
    fc6, fc7, fc8 = 4 * 4 * 128 * 1024 + 1024, 1024 * 1024 + 1024, 1024 * 10 + 10
    full = sum(convs) + fc6 + fc7 + fc8
    assert lines[0].split()[1:3] == [f"{full:,}", "0"]
    assert lines[1].split()[1:3] == [f"{full - fc7:,}", f"{fc7:,}"]
    flops = [float(line.split()[3].replace(",", "")) for line in lines]
    assert flops[3] < flops[0]  # without conv3 and conv4 the net is cheaper


def _ablation_sweep(sweep_dir, accuracies: dict[str, list[float]]) -> None:
    """A finished ablation sweep as launch.sweep leaves it: sweep.json, config.json and
    metrics.jsonl per run, and runs.csv."""
    (sweep_dir / sweep.SPEC_FILE).write_text(json.dumps({"config": CONFIG_FILE, "base": {}}))
    base = alexnet_depth_ablation.get_config()
    for point in alexnet_depth_ablation.get_sweep():
        name = sweep.workdir_name(point)
        workdir = sweep_dir / name
        workdir.mkdir()
        workdir_lib.write_config(workdir, summary.with_overrides(base, point), {})
        accuracy = accuracies[point["label"]][point["seed"]]
        record = {"step": 1, "epoch": 1.0, "split": "test", "accuracy": accuracy}
        (workdir / workdir_lib.METRICS_FILE).write_text(json.dumps(record) + "\n")
        sweep.update_index(sweep_dir, name, point, "done")


def test_report_gives_parameters_dropped_change_and_the_lecture_column(tmp_path):
    accuracies = {label: [0.9, 0.92, 0.94] for label in alexnet_depth_ablation.VARIANTS}
    accuracies["-fc7"] = [0.88, 0.9, 0.92]  # 0.02 below the full net
    _ablation_sweep(tmp_path, accuracies)
    paths = report.write_report(tmp_path)
    table = paths["md"].read_text()
    header = next(line for line in table.splitlines() if line.startswith("| label"))
    assert header == (
        "| label | finished/runs | test_accuracy | parameters | dropped vs full | change vs full "
        "| ImageNet (lecture) |"
    )
    config = alexnet_depth_ablation.get_config()
    full = summary.parameter_count(config)
    config.model.remove = ("fc7",)
    without_fc7 = summary.parameter_count(config)
    assert (
        f"| -fc7 | 3/3 | 0.9000 +- 0.0200 | {without_fc7:,} | {full - without_fc7:,} | -0.0200 "
        f"| {alexnet_depth_ablation.LECTURE['-fc7']} |"
    ) in table
    assert f"| full | 3/3 | 0.9200 +- 0.0200 | {full:,} | 0 | +0.0000 |" in table
    with pytest.raises(ValueError, match="-fc6-fc7"):
        report.write_report(tmp_path, baseline="none")
