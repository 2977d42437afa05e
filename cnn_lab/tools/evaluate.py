"""Evaluate runs: `python -m cnn_lab.evaluate --workdir=<dir> [--checkpoint=best] [--split=test]`."""

import functools
import hashlib
import itertools
import json
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cnn_lab import checkpoint, command_line, predictors, saved_run
from cnn_lab import workdir as workdir_lib
from cnn_lab.data import augment, inputs, pipeline
from cnn_lab.data.inputs import split_string
from cnn_lab.evaluation import recompute_batch_stats
from cnn_lab.runtime import host, sharding
from cnn_lab.tools import predict
from cnn_lab.workdir import PREDICTIONS_DIR


def _row(
    workdir: Path, model: str, checkpoint_name: str, members: list[np.ndarray], labels
) -> dict:
    """One table row: scores of the members' ensemble, and the members' own accuracy."""
    row = {"workdir": str(workdir), "model": model, "checkpoint": checkpoint_name}
    row |= predict.scores(predict.ensemble(members), labels)
    row["members"] = len(members)
    if len(members) > 1:
        accuracies = [predict.scores(m, labels)["accuracy"] for m in members]
        row["member_accuracies"] = accuracies
        row["disagreement"] = predict.disagreement(members)
    return row


def evaluate_run(
    workdir: str | Path,
    checkpoint_name: str = "best",
    split: str = "test",
    variants: tuple[str, ...] | None = None,
    snapshots: int | None = None,
) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Table rows of a run's model variants on `split`; writes eval_<checkpoint>_<split>.json.

    Variants: raw, each kept average (ema, polyak), the snapshot ensemble, and test-time
    augmentations of the raw model (flip, crops, scales, mc_dropout) where they apply;
    `variants` picks some; `snapshots` overrides config.eval.snapshots. Predictions are cached in <workdir>/predictions/. Returns the
    rows, and the raw model's log-probabilities (N, K) and labels (N,) for ensembles.
    """
    workdir = Path(workdir)
    run = saved_run.open_run(workdir)  # Config and model once, for every variant below.
    model, config = run.model, run.config
    raw, step = run.restore(checkpoint_name)
    mesh = sharding.make_mesh()
    log_probs, read_labels = _predictions(run, workdir, split, mesh)
    raw_name = f"{checkpoint_name}@{step}"
    snapshot_steps = run.snapshot_steps()
    last = config.eval.snapshots if snapshots is None else snapshots
    if last:
        snapshot_steps = snapshot_steps[-last:]
    wanted = _chosen_variants(run, raw, bool(snapshot_steps), variants, workdir)
    # Read once for every average that re-estimates its BatchNorm statistics.
    train_batches = functools.cache(lambda: _train_batches(config, mesh))
    raw_log_probs = log_probs(raw_name, raw)
    labels = read_labels()
    rows = []
    for variant in wanted:
        if variant == "raw":
            rows.append(_row(workdir, "raw", raw_name, [raw_log_probs], labels))
        elif variant in ("ema", "polyak"):
            variables, _ = run.restore(checkpoint_name, variant)
            if config.averaging.batch_stats == "recompute":  # As validation in training did.
                variables = recompute_batch_stats(
                    model,
                    variables,
                    train_batches(),
                    mesh,
                    augment.normalizer(tuple(config.data.mean), tuple(config.data.std)),
                )
            members = [log_probs(f"{raw_name}-{variant}", variables)]
            rows.append(_row(workdir, variant, raw_name, members, labels))
        elif variant == "snapshots":
            members = [
                log_probs(f"snapshot@{s}", run.restore(f"snapshot:{s}")[0]) for s in snapshot_steps
            ]
            name = f"snapshot@{snapshot_steps[0]}..{snapshot_steps[-1]}"
            rows.append(_row(workdir, f"snapshots({len(members)})", name, members, labels))
        else:
            members = [log_probs(raw_name, raw, variant)]
            rows.append(_row(workdir, f"tta:{variant}", raw_name, members, labels))
    class_names = list(config.data.class_names)  # Label order (saved_run attaches them).
    per_class = {"per_class_accuracy": _per_class_accuracy(raw_log_probs, labels)}
    per_class["class_names"] = class_names
    for row in rows:
        if row["model"] == "raw":
            row |= per_class
    result = {"workdir": str(workdir), "checkpoint": checkpoint_name, "step": step, "split": split}
    result |= predict.scores(raw_log_probs, labels) | per_class | {"rows": rows}
    name = f"eval_{checkpoint_name}_{split}.json".replace("/", "_").replace(":", "_")
    if jax.process_index() == 0:
        (workdir / name).write_text(json.dumps(result, indent=2) + "\n")
    return rows, raw_log_probs, labels


def _predictions(run: saved_run.SavedRun, workdir: Path, split: str, mesh: Mesh) -> tuple:
    """(log_probs, labels): log_probs(name, variables, variant="plain") -> (N, K) of one model
    variant on `split`, from <workdir>/predictions/ when there; labels() -> (N,) as they saw them.
    """
    model, config = run.model, run.config
    # Padding and masking make any batch size exact: round up to split over these devices.
    batch_size = -(-config.eval.batch_size // mesh.size) * mesh.size
    tfds_split = split_string(config.data, split)
    # Device mode reads the split into memory once for every variant; streaming re-reads it.
    in_memory = (
        pipeline.load(config.data, tfds_split)
        if inputs.choose_mode(config.data) == "device"
        else None
    )
    # The run's config (rewritten by every start or resume) keys the cache: predictions of
    # another experiment in the same workdir are never read back. Several processes would
    # each decide on their own whether to predict (a collective): no cache there.
    fingerprint = hashlib.sha1((workdir / workdir_lib.CONFIG_FILE).read_bytes()).hexdigest()[:10]
    cache = jax.process_count() == 1
    labels_path = _cache_path(workdir, f"{split}-labels-{fingerprint}")
    split_labels: list[np.ndarray] = []  # Labels as the predictions saw them.

    @functools.cache
    def make_fn(variant: str) -> predictors.PredictFn:
        """One predict function per variant: members of an ensemble share its compilation."""
        return predictors.make_predict_fn(
            model,
            variant,
            image_size=config.data.image_size,
            flip=config.data.flip_preserves_label,
            crop_fraction=config.eval.crop_fraction,
            scales=tuple(config.eval.scales),
            mc_samples=config.eval.mc_dropout_samples,
            # Crops as training shifted the images, padded with its black (0 before normalising).
            crop_padding=config.augment.crop_padding,
            crop_fill=tuple(-m / s for m, s in zip(config.data.mean, config.data.std, strict=True)),
        )

    def log_probs(name: str, variables: dict, variant: str = "plain") -> np.ndarray:
        detail = {
            "crops": (
                f"pad{config.augment.crop_padding}"
                if config.augment.crop_padding
                else f"{config.eval.crop_fraction}"
            )
            + ("-flip" if config.data.flip_preserves_label else ""),
            "scales": "-".join(map(str, config.eval.scales)),
            "mc_dropout": str(config.eval.mc_dropout_samples),
        }.get(variant, "")
        key = f"{split}-{name}-{variant}{'-' + detail if detail else ''}-{fingerprint}"
        path = _cache_path(workdir, key)
        if cache and path.exists() and labels_path.exists():
            return np.load(path)
        variables = jax.device_put(variables, sharding.replicated(mesh))
        batches = inputs.eval_batches(config.data, tfds_split, batch_size, in_memory=in_memory)
        result, labels = predict.predict(
            make_fn(variant), variables, batches, config.data, mesh, jax.random.PRNGKey(config.seed)
        )
        split_labels.append(labels)
        if cache:
            _save(path, result)
            _save(labels_path, labels)
        return result

    def labels() -> np.ndarray:
        return split_labels[0] if split_labels else np.load(labels_path)

    return log_probs, labels


def _chosen_variants(
    run: saved_run.SavedRun,
    raw: dict,
    has_snapshots: bool,
    variants: tuple[str, ...] | None,
    workdir: Path,
) -> list[str]:
    """The variants that apply to the run, those of `variants` only (ValueError for others)."""
    model, config = run.model, run.config
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    applicable = {
        "raw": True,
        **dict.fromkeys(run.averages.names, True),
        "snapshots": has_snapshots,
        "flip": config.data.flip_preserves_label,
        "crops": True,
        "scales": bool(config.eval.scales)
        and all(
            predict.accepts_size(model, raw, size, config.data.channels)
            for size in config.eval.scales
        ),
        "mc_dropout": config.eval.mc_dropout_samples > 0
        and predict.has_dropout(model, raw, image_shape),
    }
    if variants is not None and (
        unknown := set(variants) - {v for v, ok in applicable.items() if ok}
    ):
        raise ValueError(
            f"--variants {sorted(unknown)} do not apply to {workdir}; those that do: "
            f"{', '.join(v for v, ok in applicable.items() if ok)}."
        )
    return [v for v, ok in applicable.items() if ok and (variants is None or v in variants)]


def _per_class_accuracy(log_probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """Accuracy of log_probs (N, K) on each class of labels (N,); NaN for a class not there."""
    correct = log_probs.argmax(-1) == labels
    return [
        float(np.mean(correct[labels == k])) if np.any(labels == k) else math.nan
        for k in range(log_probs.shape[-1])
    ]


def _cache_path(workdir: Path, key: str) -> Path:
    return workdir / PREDICTIONS_DIR / (key.replace("/", "_").replace(":", "_") + ".npy")


def _save(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` atomically: never a half-written cache file."""
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_suffix(".tmp.npy")
    np.save(temporary, array)
    temporary.replace(path)


def _train_batches(config: ml_collections.ConfigDict, mesh: Mesh) -> list[pipeline.Batch]:
    """The first `config.averaging.recompute_batches` training batches of epoch 0 (global)."""
    batch_size = -(-config.train.batch_size // mesh.size) * mesh.size
    data = inputs.make_inputs(config.data, batch_size, mesh, seed=config.seed)
    return list(itertools.islice(data.train_batches(0), config.averaging.recompute_batches))


def ensemble_row(
    workdirs: list[str | Path], members: list[np.ndarray], labels: list[np.ndarray]
) -> dict:
    """The row of an ensemble of runs' raw models: they must share the split's examples."""
    for workdir, other in zip(workdirs[1:], labels[1:], strict=True):
        if other.shape != labels[0].shape or not np.array_equal(other, labels[0]):
            raise ValueError(
                f"--ensemble: {workdir} was evaluated on other examples than {workdirs[0]} "
                f"({len(other)} vs {len(labels[0])} labels, or in another order). Ensemble runs "
                "of the same data set, classes and split."
            )
    if len({m.shape[-1] for m in members}) > 1:
        raise ValueError(
            f"--ensemble: the runs predict different numbers of classes "
            f"({[m.shape[-1] for m in members]}). Ensemble runs of the same data set."
        )
    return _row(Path("ensemble"), f"ensemble({len(members)})", "raw", members, labels[0])


def format_table(rows: list[dict]) -> str:
    """One line per evaluated model: accuracy, NLL, ECE; ensembles add members' accuracy."""
    header = (
        f"{'workdir':<28} {'model':<14} {'checkpoint':>18} {'top-1':>7} {'NLL':>7} {'ECE':>7} "
        f"{'members top-1 (min-max)':>25} {'disagree':>8} {'n':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        members = "-"
        if "member_accuracies" in r:
            acc = r["member_accuracies"]
            members = f"{r['members']}: {np.mean(acc):.4f} ({min(acc):.4f}-{max(acc):.4f})"
        disagree = f"{r['disagreement']:.4f}" if "disagreement" in r else "-"
        lines.append(
            f"{r['workdir'][-28:]:<28} {r['model']:<14} {r['checkpoint'][-18:]:>18} "
            f"{r['accuracy']:7.4f} {r['nll']:7.4f} {r['ece']:7.4f} {members:>25} "
            f"{disagree:>8} {r['count']:>6}"
        )
    for r in rows:
        if "per_class_accuracy" in r:
            names = r.get("class_names") or range(len(r["per_class_accuracy"]))
            per_class = "  ".join(
                f"{name}: {a:.3f}" for name, a in zip(names, r["per_class_accuracy"], strict=True)
            )
            lines.append(f"per-class accuracy, {r['workdir'][-40:]}: {per_class}")
    return "\n".join(lines)


def main() -> None:
    """Command line: workdirs (--workdir, repeatable, or positional), --checkpoint, --split."""
    from absl import app, flags

    workdirs = flags.DEFINE_multi_string("workdir", [], "Run directory; repeat for several.")
    which = flags.DEFINE_string(
        "checkpoint", "best", "best | latest | a step number | snapshot:<step>."
    )
    split = flags.DEFINE_string("split", "test", "train | val | test | any TFDS split string.")
    ensemble = flags.DEFINE_bool(
        "ensemble", False, "Also average the softmax outputs of the runs' raw models."
    )
    snapshots = flags.DEFINE_integer(
        "snapshots",
        None,
        "Snapshot ensemble of the last this many (default: config.eval.snapshots).",
    )
    variants = flags.DEFINE_list(
        "variants",
        None,
        "Evaluate only these: raw, ema, polyak, snapshots, flip, crops, scales, mc_dropout "
        "(default: every one that applies).",
    )

    def run(argv: list[str]) -> None:
        runs = [*workdirs.value, *argv[1:]]
        try:
            if not runs:
                raise ValueError("No run given: pass --workdir=<dir> or workdirs as arguments.")
            if ensemble.value and len(runs) < 2:
                raise ValueError(f"--ensemble needs at least 2 workdirs, got {runs}.")
            if (Path(runs[0]) / workdir_lib.CONFIG_FILE).exists():  # Else evaluate_run says why.
                config = workdir_lib.read_config(Path(runs[0]))
                host.prepare(config)
            rows, members, labels = [], [], []
            for w in runs:
                run_rows, log_probs, run_labels = evaluate_run(
                    w,
                    which.value,
                    split.value,
                    tuple(variants.value) if variants.value else None,
                    snapshots.value,
                )
                rows += run_rows
                members.append(log_probs)
                labels.append(run_labels)
            if ensemble.value:
                rows.append(ensemble_row(runs, members, labels))
                path = Path(runs[0]) / f"ensemble_{which.value}_{split.value}.json".replace(
                    ":", "_"
                )
                if jax.process_index() == 0:
                    path.write_text(json.dumps({"workdirs": runs, "rows": rows}, indent=2) + "\n")
        except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as error:
            command_line.report(error)  # The message says what to change; no traceback.
        print(format_table(rows))

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
