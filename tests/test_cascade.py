"""Model cascades of finished runs: exits at the ends of the threshold range, monotone cost,
ensemble members, refused mixes of data sets, every image counted once, and the CLI."""

import json
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cnn_lab.configs import mlp_digits
from cnn_lab.tools import cascade, evaluate, predict, summary
from cnn_lab.train import train_and_evaluate


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """Three tiny MLPs on digits, cheapest first; evaluation batches of 48 pad the 128 test
    and 128 validation images."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdirs = []
    for seed, hidden in enumerate(((4,), (32,), (128,))):
        config = mlp_digits.get_config("smoke")
        for field, value in {**tiny_run, "model.hidden_sizes": hidden}.items():
            section, name = field.split(".")
            config[section][name] = value
        config.data.data_dir = data_dir
        config.eval.batch_size = 48
        config.seed = seed
        workdir = tmp_path_factory.mktemp(f"mlp{hidden[0]}")
        train_and_evaluate(config, workdir)
        workdirs.append(workdir)
    return workdirs


def _test_accuracy(workdir) -> float:
    return evaluate.evaluate_run(workdir, "best", "test", ("raw",))[0][0]["accuracy"]


def test_threshold_one_sends_every_image_to_the_last_member(runs):
    result = cascade.cascade([str(w) for w in runs], thresholds=[1.0, 1.0])
    test = result["results"]["test"]
    assert test["accuracy"] == _test_accuracy(runs[-1])
    assert test["exit_shares"] == [0.0, 0.0, 1.0]
    assert test["flops"] == pytest.approx(sum(m["flops"] for m in result["members"]))


def test_threshold_zero_stops_every_image_at_the_first_member(runs):
    result = cascade.cascade([str(w) for w in runs], thresholds="0")
    test = result["results"]["test"]
    assert test["accuracy"] == _test_accuracy(runs[0])
    assert test["exit_shares"] == [1.0, 0.0, 0.0]
    assert test["flops"] == pytest.approx(result["members"][0]["flops"])


def test_cost_rises_with_the_thresholds_and_every_image_is_counted_once(runs):
    result = cascade.cascade([str(w) for w in runs], thresholds="0.5,0.5")
    flops = [point["flops"] for point in result["curve"]]
    assert np.all(np.diff(flops) >= 0) and flops[-1] > flops[0]
    # Members' costs rise as listed (wider hidden layers), so the order is cheapest first.
    assert np.all(np.diff([m["flops"] for m in result["members"]]) > 0)
    for split in ("test", "val"):
        # 128 images in batches of 48: the padded 16 rows of the last batch are masked out.
        assert result["results"][split]["count"] == 128
        assert sum(result["results"][split]["exit_shares"]) == pytest.approx(1.0)


def test_an_ensemble_member_averages_its_runs_and_adds_their_costs(runs):
    cheap, middle, wide = (str(w) for w in runs)
    result = cascade.cascade([cheap, f"{middle}+{wide}"], thresholds=[1.0])
    single = cascade.cascade([cheap, middle], thresholds=[1.0])
    flops = {run["workdir"]: run["flops"] for run in result["runs"]}
    assert result["members"][1]["flops"] == pytest.approx(flops[middle] + flops[wide])
    members = [evaluate.evaluate_run(w, "best", "test", ("raw",))[1:] for w in (middle, wide)]
    expected = predict.scores(predict.ensemble([m[0] for m in members]), members[0][1])
    assert result["results"]["test"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert single["members"][1]["flops"] == pytest.approx(flops[middle])


def test_auto_thresholds_are_selected_on_validation(runs):
    result = cascade.cascade([str(w) for w in runs])
    assert result["select_on"] == "val" and len(result["thresholds"]) == 2
    val = result["results"]["val"]
    best = max(m["accuracy"]["val"] for m in result["members"])
    reference = next(m for m in result["members"] if m["name"] == result["reference"])
    assert reference["accuracy"]["val"] == best
    # Every threshold 1 reaches the last member's accuracy: the selection is never worse.
    assert val["accuracy"] >= result["members"][-1]["accuracy"]["val"]


def test_selection_picks_the_cheapest_cascade_that_matches_the_target():
    # The cheap member is right and sure on the first two images, unsure and wrong on the rest.
    correct = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
    confidences = np.array([[0.9, 0.9, 0.6, 0.6], [0.99, 0.99, 0.99, 0.99]])
    thresholds = cascade.select_thresholds(correct, confidences, [1.0, 10.0], target=1.0)
    result = cascade.outcome(correct, confidences, [1.0, 10.0], thresholds)
    assert result["accuracy"] == 1.0 and result["exit_shares"] == [0.5, 0.5]
    assert result["flops"] == pytest.approx((2 * 1 + 2 * 11) / 4)


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("data", "name", "mnist", "data set 'mnist'"),
        ("model", "num_classes", 5, "5 outputs"),
        ("data", "test_split", "test[:64]", "test\\[:64\\]"),
    ],
)
def test_runs_of_other_images_or_classes_are_refused(
    runs, tmp_path, section, field, value, message
):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    record = json.loads((other / "config.json").read_text())
    record["config"][section][field] = value
    (other / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"same images.*{message}"):
        cascade.cascade([str(runs[0]), str(other)], thresholds="0.5")


def test_bad_thresholds_say_what_to_give(runs):
    with pytest.raises(ValueError, match="2 numbers in \\[0, 1\\]"):
        cascade.cascade([str(w) for w in runs], thresholds="0.5,0.5,0.5")
    with pytest.raises(ValueError, match="at least 2 members"):
        cascade.cascade([str(runs[0])])


def test_flops_count_the_convolutions_whatever_kernels_the_run_used():
    # LeNet-5 at 32x32 (no padding): 2 FLOPs per multiply-add of its convs and dense layers.
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 25 * 6 + 400 * 120 + 120 * 84 + 84 * 10
    for implementation in ("xla", "onednn", "batch_minor"):
        model = ml_collections.ConfigDict(
            {"name": "lenet5", "num_classes": 10, "conv_implementation": implementation}
        )
        flops = summary.flops_per_image(model, (32, 32, 1))
        assert 2 * macs <= flops < 1.1 * 2 * macs  # The rest: biases, activations, pools.


@pytest.mark.slow
def test_cli_gives_the_function_results_and_a_curve(runs, tmp_path, launch):
    members = [str(runs[0]), f"{runs[1]}+{runs[2]}"]
    out = launch("cnn_lab.cascade", *members, f"--output_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((tmp_path / "cascade_test.json").read_text())
    assert written == json.loads(json.dumps(cascade.cascade(members)))
    assert "cascade" in out.stdout and "speed-up" in out.stdout
    image = np.asarray(Image.open(tmp_path / "cascade_test.png").convert("L"))
    assert image.std() > 0
    out = launch("cnn_lab.cascade", *members, "--thresholds=2")
    assert out.returncode != 0 and "error: --thresholds='2'" in out.stderr
