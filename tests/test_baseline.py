"""scikit-learn baselines: the same splits as training, chosen on validation, read by the report."""

import csv
import sys

import numpy as np
import pytest

from cnn_lab import sweep
from cnn_lab.configs import common, pixels_fashion_mnist
from cnn_lab.tools import baseline, results


def _digits_config(tmp_path, **baseline_fields):
    """The baseline config on the embedded digits (8x8), smoke-sized splits."""
    config = pixels_fashion_mnist.get_config("smoke")
    stats = common.DATASETS["digits"]
    config.data.name, config.data.image_size = "digits", 8
    config.data.mean, config.data.std = stats["mean"], stats["std"]
    config.data.data_dir = str(tmp_path / "tfds")
    config.baseline.update(baseline_fields)
    return config


def test_logistic_regression_is_chosen_on_validation_and_reported(tmp_path):
    from sklearn.linear_model import LogisticRegression

    config = _digits_config(tmp_path, c_values=(1e-4, 1.0), max_iter=300)
    sweep_dir = tmp_path / "logistic"
    config_file = "configs/pixels_fashion_mnist.py"
    (metrics,) = baseline.run_sweep(config_file, config, sweep_dir, 1, {"data.name": "digits"})
    records = {r["split"]: r for r in baseline.workdir_lib.read_metrics(sweep_dir / "seed=0")}
    tried = {t["C"]: t["accuracy"] for t in records["val"]["tried"]}
    assert records["val"]["C"] == max(tried, key=tried.get) and tried[1e-4] < tried[1.0]
    train, test = baseline.pixels(config, "train"), baseline.pixels(config, "test")
    assert train[0].shape == (512, 64) and len(test[1]) == 256  # The smoke splits, flattened.
    again = LogisticRegression(C=records["val"]["C"], max_iter=300).fit(*train)
    assert metrics["test_accuracy"] == pytest.approx(again.score(*test))
    assert metrics["test_parameters"] == 8 * 8 * 10 + 10 and metrics["val_epoch_seconds"] > 0
    paths = results.write_results([sweep_dir], tmp_path / "table")
    with open(paths["csv"]) as f:
        (row,) = list(csv.DictReader(f))
    assert (row["config"], row["point"], row["parameters"]) == (
        "pixels_fashion_mnist",
        "data.name=digits",
        "650",
    )
    assert float(row["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
    assert float(row["wall_seconds"]) == pytest.approx(metrics["val_epoch_seconds"])
    assert row["published"].startswith("0.842 LogisticRegression")
    # A rerun keeps the finished seed: nothing is fitted again.
    mtime = (sweep_dir / "seed=0" / "metrics.jsonl").stat().st_mtime_ns
    baseline.run_sweep(config_file, config, sweep_dir, 1, {"data.name": "digits"})
    assert (sweep_dir / "seed=0" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert sweep.read_index(sweep_dir)[0]["status"] == "done"


def test_mlp_classifier_of_the_configs_hidden_sizes(tmp_path):
    config = _digits_config(tmp_path, classifier="mlp", alpha_values=(1e-3,), max_iter=50)
    config.model.hidden_sizes = (16,)
    result = baseline.fit_and_evaluate(config, tmp_path / "run")
    assert result["test"]["parameters"] == 64 * 16 + 16 + 16 * 10 + 10
    assert result["test"]["accuracy"] > 0.5 and np.isfinite(result["test"]["loss"])


def test_mismatched_classifier_and_hidden_sizes_and_missing_sklearn_say_the_fix(
    tmp_path, monkeypatch
):
    config = _digits_config(tmp_path, classifier="mlp")
    with pytest.raises(ValueError, match=r"hidden_sizes=\(\)"):
        baseline.candidates(config)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"\.\[baselines\]"):
        baseline.candidates(_digits_config(tmp_path))
