"""scikit-learn baselines on the pixels: `python -m cnn_lab.baseline --config=<file> --sweep_dir=<dir>`.

Loads the config's train, validation and test splits through cnn_lab's data code (the same
examples, image size and normalisation as a training run; no augmentation), fits
`config.baseline.classifier` once per candidate regularisation, keeps the candidate with the
best validation accuracy (the test split chooses nothing) and scores it on the test split.

Each seed's run goes to <sweep_dir>/seed=<s>/ as a training run's would: config.json and
metrics.jsonl with one validation record (the chosen candidate; `epoch_seconds`: the time
of every fit and its validation) and one test record (with the classifier's `parameters`).
The sweep directory gets sweep.json and runs.csv, so `python -m cnn_lab.report` puts the
baseline in the same table as the CNN sweeps. Rerunning skips the finished seeds.
"""

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from cnn_lab import sweep
from cnn_lab import workdir as workdir_lib
from cnn_lab.data import inputs, pipeline

CLASSIFIERS = ("logistic_regression", "mlp")


def _sklearn():
    """The sklearn modules used here; ImportError naming the extra when it is missing."""
    try:
        from sklearn import linear_model, metrics, neural_network
    except ImportError as error:
        raise ImportError(
            "cnn_lab.baseline needs scikit-learn, which cnn_lab installs only with its "
            "`baselines` extra: pip install -e '.[baselines]' (or pip install scikit-learn)."
        ) from error
    return linear_model, metrics, neural_network


def pixels(config: ml_collections.ConfigDict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened normalised images (N, H*W*C) float32 and labels (N,) of "train", "val" or "test"."""
    data = config.data
    if split == "train":
        loaded = pipeline.load_train(data, config.seed)
    else:
        loaded = pipeline.load(data, inputs.split_string(data, split))
    images = pipeline.normalize(loaded.images, tuple(data.mean), tuple(data.std))
    return images.reshape(len(images), -1), loaded.labels


def candidates(config: ml_collections.ConfigDict) -> list[tuple[str, float, object]]:
    """(hyper-parameter name, value, unfitted classifier) for each candidate of the config."""
    linear_model, _, neural_network = _sklearn()
    settings = config.baseline
    hidden = tuple(config.model.hidden_sizes)
    if settings.classifier == "logistic_regression" and not hidden:
        return [
            ("C", c, linear_model.LogisticRegression(C=c, max_iter=settings.max_iter))
            for c in settings.c_values
        ]
    if settings.classifier == "mlp" and hidden:
        return [
            (
                "alpha",
                alpha,
                neural_network.MLPClassifier(
                    hidden, alpha=alpha, max_iter=settings.max_iter, random_state=config.seed
                ),
            )
            for alpha in settings.alpha_values
        ]
    raise ValueError(
        f"config.baseline.classifier={settings.classifier!r} with config.model.hidden_sizes="
        f"{hidden}: use logistic_regression with hidden_sizes=() or mlp with at least one "
        f"hidden layer, e.g. --config.model.hidden_sizes='(100,)' (classifiers: {CLASSIFIERS})."
    )


def _scores(classifier, features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """{"loss", "accuracy", "count"} of a fitted classifier (loss: mean NLL)."""
    _, metrics, _ = _sklearn()
    probabilities = classifier.predict_proba(features)
    return {
        "loss": float(metrics.log_loss(labels, probabilities, labels=range(num_classes))),
        "accuracy": float(np.mean(classifier.classes_[probabilities.argmax(-1)] == labels)),
        "count": len(labels),
    }


def parameter_count(classifier) -> int:
    """Weights and biases of a fitted LogisticRegression or MLPClassifier."""
    if hasattr(classifier, "coefs_"):  # MLPClassifier: one matrix and bias per layer.
        arrays = [*classifier.coefs_, *classifier.intercepts_]
    else:
        arrays = [classifier.coef_, classifier.intercept_]
    return int(sum(a.size for a in arrays))


def fit_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Fit every candidate, choose on validation, score on test; write the run's workdir.

    Returns {"val": record, "test": record}, the records written to metrics.jsonl.
    """
    workdir = Path(workdir)
    models = candidates(config)  # Errors in the config before loading any data.
    train, val, test = (pixels(config, split) for split in ("train", "val", "test"))
    num_classes = config.model.num_classes
    start = time.perf_counter()
    tried = []
    for name, value, classifier in models:
        classifier.fit(*train)
        tried.append((_scores(classifier, *val, num_classes), name, value, classifier))
    val_record, name, value, chosen = max(tried, key=lambda t: t[0]["accuracy"])
    val_record |= {
        "epoch_seconds": time.perf_counter() - start,
        name: value,
        "tried": [{name: v, "accuracy": s["accuracy"]} for s, _, v, _ in tried],
    }
    test_record = _scores(chosen, *test, num_classes) | {"parameters": parameter_count(chosen)}
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.write_config(workdir, config, {"fitted_by": type(chosen).__name__})
    records = [
        {"step": 1, "epoch": 1.0, "split": "val", **val_record},
        {"step": 1, "epoch": 1.0, "split": "test", **test_record},
    ]
    metrics_file = workdir / workdir_lib.METRICS_FILE
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"val": val_record, "test": test_record}


def run_sweep(
    config_file: str,
    config: ml_collections.ConfigDict,
    sweep_dir: str | Path,
    seeds: int,
    overrides: sweep.Overrides,
) -> list[dict]:
    """Fit seeds 0 .. seeds - 1 into <sweep_dir>/seed=<s>/, recorded as launch.sweep does."""
    candidates(config)  # A config error stops here, before anything is written.
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    points = sweep.seeds(seeds)
    spec = {"config": config_file, "base": overrides, "points": points}
    (sweep_dir / sweep.SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    results = []
    for point in points:
        name = sweep.workdir_name(point)
        if sweep.final_metrics(sweep_dir / name) is None:
            seeded = ml_collections.ConfigDict(config.to_dict())
            seeded.seed = point["seed"]
            fit_and_evaluate(seeded, sweep_dir / name)
        sweep.update_index(sweep_dir, name, point, "done")
        results.append(sweep.final_metrics(sweep_dir / name))
    return results


def main() -> None:
    """Command line: --config=<file>[:mode] (--config.<field>=<value>...), --sweep_dir, --seeds."""
    from absl import app, flags
    from ml_collections import config_flags

    from cnn_lab import command_line

    config = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    sweep_dir = flags.DEFINE_string("sweep_dir", None, "Directory of the baseline's runs.")
    seeds = flags.DEFINE_integer("seeds", 1, "Runs with seeds 0 .. seeds - 1.")
    flags.mark_flags_as_required(["config", "sweep_dir"])

    def run(argv: list[str]) -> None:
        del argv
        config_flag = flags.FLAGS["config"]  # Its file and --config.<field> overrides.
        config_file = config_flags.get_config_filename(config_flag)
        overrides = config_flags.get_override_values(config_flag)
        try:
            results = run_sweep(config_file, config.value, sweep_dir.value, seeds.value, overrides)
        except (ImportError, ValueError, FileNotFoundError) as error:
            command_line.report(error)
        for seed, metrics in enumerate(results):
            print(
                f"seed {seed}: val accuracy {metrics['val_accuracy']:.4f}, "
                f"test accuracy {metrics['test_accuracy']:.4f}, "
                f"{metrics['val_epoch_seconds']:.0f} s"
            )

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
