"""Model cascades of finished runs (Wang et al., ICLR 2022, "Wisdom of Committees").

    python -m cnn_lab.cascade RUN_A RUN_B [RUN_C+RUN_D ...] [--split=test] \\
        [--thresholds=auto|0.9,0.8] [--select_on=val] [--checkpoint=best] [--output_dir=DIR]

Members run in the order given (cheapest first; "RUN_C+RUN_D" is an ensemble of runs, its
softmax outputs averaged). An image exits at the first member whose confidence, its
largest softmax probability, exceeds that member's threshold; the last member takes the
rest. A member's cost is its forward FLOPs per image from XLA's cost analysis (an
ensemble's: the sum of its runs'), and an image costs every member it went through.

`--thresholds=auto` (the default) picks one threshold per member but the last on the
--select_on split (val unless asked otherwise: test numbers then stay unbiased): the
lowest average cost whose accuracy matches the most accurate member's there, else the
highest accuracy. The cascade is then reported on --split. Predictions come from each run's
prediction cache (predictions/, written by `python -m cnn_lab.evaluate`) or are made and
cached. Writes cascade_<split>.json and cascade_<split>.png (accuracy against average FLOPs,
one threshold shared by every member from 0 to 1, with each run and ensemble as a point)
into --output_dir (default: the first run's workdir). `cascade()` returns the same results.
"""

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging

from cnn_lab import checkpoint as checkpoint_lib
from cnn_lab import command_line
from cnn_lab import workdir as workdir_lib
from cnn_lab.data.inputs import split_string
from cnn_lab.runtime import host
from cnn_lab.tools import evaluate, predict, summary

ENSEMBLE_SEPARATOR = "+"  # "RUN_X+RUN_Y": one member, the average of the runs' probabilities.
MAX_CANDIDATES = 20_000  # Threshold combinations tried by --thresholds=auto.
CURVE_POINTS = 101  # Shared thresholds 0, 0.01, ..., 1 of the PNG's curve.


def member_workdirs(spec: str) -> tuple[Path, ...]:
    """The runs of a member: "RUN" -> (RUN,), "RUN_X+RUN_Y" -> (RUN_X, RUN_Y)."""
    return tuple(Path(part) for part in spec.split(ENSEMBLE_SEPARATOR) if part)


def check_same_images(workdirs: Sequence[Path], splits: Sequence[str]) -> None:
    """Raise ValueError unless every run was trained on one data set, classes and `splits`."""
    seen = {}
    for workdir in workdirs:
        config = workdir_lib.read_config(workdir)
        key = (
            config.data.name,
            tuple(config.data.classes),
            config.model.num_classes,
            tuple(split_string(config.data, s) for s in splits),
        )
        seen.setdefault(key, workdir)
    if len(seen) > 1:
        described = "; ".join(
            f"{w}: data set {k[0]!r}, classes {k[1] or 'all'}, {k[2]} outputs, splits {k[3]}"
            for k, w in seen.items()
        )
        raise ValueError(
            f"Cascade members must classify the same images into the same classes, but "
            f"{described}. Pass runs of one data set, with the same config.data.classes, "
            "model.num_classes and validation/test splits."
        )


def run_flops(workdir: Path) -> float:
    """Forward FLOPs per image of the run's model (summary.flops_per_image)."""
    config = workdir_lib.read_config(workdir)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    return summary.flops_per_image(config.model, image_shape)


def scores(
    workdirs: Sequence[Sequence[Path]], split: str, checkpoint: str
) -> tuple[np.ndarray, np.ndarray, dict[Path, float]]:
    """(correct (M, N), confidence (M, N)) of each member (its runs' softmax average) on
    `split`, and each run's own accuracy; every run must have seen the same examples."""
    runs = list(dict.fromkeys(w for member in workdirs for w in member))
    outputs = {w: evaluate.evaluate_run(w, checkpoint, split, ("raw",))[1:] for w in runs}
    labels = outputs[runs[0]][1]
    for workdir, (_, other) in outputs.items():
        if other.shape != labels.shape or not np.array_equal(other, labels):
            raise ValueError(
                f"{workdir} was evaluated on other {split} examples than {runs[0]} "
                f"({len(other)} vs {len(labels)} labels, or in another order). Cascade runs of "
                "the same data set, classes and splits."
            )
    log_probs = np.stack(
        [predict.ensemble([outputs[w][0] for w in member]) for member in workdirs]
    )  # (M, N, K)
    run_accuracy = {w: float(np.mean(p.argmax(-1) == labels)) for w, (p, _) in outputs.items()}
    return log_probs.argmax(-1) == labels, np.exp(log_probs.max(-1)), run_accuracy


def exits(confidences: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """The member (N,) each image exits at: the first whose confidence (M, N) exceeds its
    threshold (M - 1 of them), else the last. Threshold 0 stops every image, 1 none."""
    passes = confidences[:-1] > np.asarray(thresholds, np.float64)[:, None]  # (M - 1, N)
    passes = np.concatenate([passes, np.ones_like(passes[:1])])  # The last member stops all.
    return np.argmax(passes, axis=0)


def outcome(
    correct: np.ndarray,
    confidences: np.ndarray,
    flops: Sequence[float],
    thresholds: Sequence[float],
) -> dict:
    """Accuracy, average FLOPs per image and the share exiting at each member, of a cascade
    whose members are right where `correct` (M, N) and this confident (M, N)."""
    exit_at = exits(confidences, thresholds)
    spent = np.cumsum(np.asarray(flops, np.float64))  # An image pays each member it reached.
    count = correct.shape[1]
    return {
        "accuracy": float(correct[exit_at, np.arange(count)].mean()),
        "flops": float(spent[exit_at].mean()),
        "exit_shares": (np.bincount(exit_at, minlength=len(flops)) / count).tolist(),
        "count": int(count),
    }


def select_thresholds(
    correct: np.ndarray, confidences: np.ndarray, flops: Sequence[float], target: float
) -> list[float]:
    """The thresholds (M - 1) of the cheapest cascade whose accuracy reaches `target`, else of
    the most accurate one, over a grid of each member's confidence quantiles (and 0, 1)."""
    members = correct.shape[0]
    levels_each = max(2, int(MAX_CANDIDATES ** (1 / max(members - 1, 1))))
    grids = [
        np.unique(np.concatenate([[0.0, 1.0], np.quantile(c, np.linspace(0, 1, levels_each))]))
        for c in confidences[:-1]
    ]
    best, best_key = None, None
    for thresholds in itertools.product(*grids):
        result = outcome(correct, confidences, flops, thresholds)
        reaches = result["accuracy"] >= target - 1e-12
        # Reaching the target first; then the cheapest; then the most accurate.
        key = (reaches, -result["flops"] if reaches else result["accuracy"], result["accuracy"])
        if best_key is None or key > best_key:
            best, best_key = [float(t) for t in thresholds], key
    return best


def parse_thresholds(text: str, members: int) -> list[float] | None:
    """--thresholds: None for "auto"; else one value for all or one per member but the last."""
    if text == "auto":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= members - 1
    if len(values) != members - 1 or not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(
            f"--thresholds={text!r}: give 'auto', or {members - 1} numbers in [0, 1] (one per "
            "member but the last, which takes every image left), or one for all, e.g. "
            f"--thresholds={','.join(['0.9'] * (members - 1))}."
        )
    return values


def cascade(
    members: Sequence[str],
    split: str = "test",
    thresholds: str | Sequence[float] = "auto",
    select_on: str = "val",
    checkpoint: str = "best",
) -> dict:
    """The cascade of `members` (run workdirs, or "RUN_X+RUN_Y" ensembles), cheapest first.

    Thresholds "auto" are selected on `select_on` (see the module docstring) and the cascade
    reported on `split`. Returns {"members": [{"name", "workdirs", "flops", "accuracy":
    {split: ...}}], "reference": the most accurate member on `select_on`, "thresholds",
    "results": {split: {"accuracy", "flops", "exit_shares", "count", "speedup"}},
    "curve": [{"threshold", "accuracy", "flops"}] on `split`, "runs": each run's point}.
    """
    if len(members) < 2:
        raise ValueError(f"A cascade needs at least 2 members, got {list(members)}.")
    workdirs = [member_workdirs(m) for m in members]
    every_run = list(dict.fromkeys(w for runs in workdirs for w in runs))
    splits = list(dict.fromkeys([select_on, split]))
    check_same_images(every_run, splits)
    flops_of = {w: run_flops(w) for w in every_run}
    flops = [sum(flops_of[w] for w in runs) for runs in workdirs]
    if isinstance(thresholds, str):
        thresholds = parse_thresholds(thresholds, len(members))
    by_split, run_accuracy = {}, {}
    for s in splits:
        correct, confidences, accuracies = scores(workdirs, s, checkpoint)
        by_split[s] = (correct, confidences)
        for w, value in accuracies.items():
            run_accuracy.setdefault(w, {})[s] = value
    accuracy = {s: by_split[s][0].mean(axis=1) for s in splits}
    reference = int(np.argmax(accuracy[select_on]))  # First of the most accurate on select_on.
    if thresholds is None:
        correct, confidences = by_split[select_on]
        thresholds = select_thresholds(correct, confidences, flops, accuracy[select_on][reference])
    results = {}
    for s in splits:
        results[s] = outcome(*by_split[s], flops, thresholds)
        results[s]["speedup"] = flops[reference] / results[s]["flops"]
    curve = [
        {"threshold": float(t), **outcome(*by_split[split], flops, [t] * (len(members) - 1))}
        for t in np.linspace(0.0, 1.0, CURVE_POINTS)
    ]
    return {
        "split": split,
        "select_on": select_on,
        "checkpoint": checkpoint,
        "members": [
            {
                "name": name,
                "workdirs": [str(w) for w in runs],
                "flops": f,
                "accuracy": {s: float(accuracy[s][m]) for s in splits},
            }
            for m, (name, runs, f) in enumerate(zip(members, workdirs, flops, strict=True))
        ],
        "reference": members[reference],
        "thresholds": [float(t) for t in thresholds],
        "results": results,
        "curve": [{k: c[k] for k in ("threshold", "accuracy", "flops")} for c in curve],
        "runs": [
            {"workdir": str(w), "flops": flops_of[w], "accuracy": run_accuracy[w]}
            for w in every_run
        ],
    }


def format_table(result: dict) -> str:
    """The members and the cascade: accuracy, FLOPs per image, exits, speed-up."""
    split, select_on = result["split"], result["select_on"]
    members = result["members"]
    flops_ref = next(m["flops"] for m in members if m["name"] == result["reference"])
    header = (
        f"{'':<44} {split + ' acc':>9} {select_on + ' acc':>9} {'MFLOPs/img':>11} {'speed-up':>8}"
    )
    lines = [header, "-" * len(header)]
    for m in members:
        lines.append(
            f"{m['name'][-44:]:<44} {m['accuracy'][split]:9.4f} {m['accuracy'][select_on]:9.4f} "
            f"{m['flops'] / 1e6:11.3f} {flops_ref / m['flops']:8.2f}"
        )
    test, val = result["results"][split], result["results"][select_on]
    lines.append(
        f"{'cascade':<44} {test['accuracy']:9.4f} {val['accuracy']:9.4f} "
        f"{test['flops'] / 1e6:11.3f} {test['speedup']:8.2f}"
    )
    lines.append(f"thresholds: {', '.join(f'{t:.4f}' for t in result['thresholds'])}")
    shares = ", ".join(
        f"{m['name'][-30:]} {share:.1%}"
        for m, share in zip(members, test["exit_shares"], strict=True)
    )
    lines.append(f"exits on {split} ({test['count']} images): {shares}")
    lines.append(f"speed-up against {result['reference']} (most accurate on {select_on})")
    if split == select_on:
        lines.append(f"note: thresholds selected on {split} itself; its accuracy is optimistic")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Accuracy against average FLOPs per image on the reported split: the cascade's curve
    over a shared threshold, each run and each ensemble member as a point, the chosen cascade."""
    import matplotlib

    matplotlib.use("Agg")  # Files only.
    import matplotlib.pyplot as plt

    split = result["split"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curve = result["curve"]
    ax.plot([c["flops"] for c in curve], [c["accuracy"] for c in curve], "-", label="cascade")
    for run in result["runs"]:
        ax.plot(run["flops"], run["accuracy"][split], "o", color="tab:gray")
        ax.annotate(Path(run["workdir"]).name, (run["flops"], run["accuracy"][split]), fontsize=7)
    for m in (m for m in result["members"] if len(m["workdirs"]) > 1):
        ax.plot(m["flops"], m["accuracy"][split], "s", color="tab:green")
        ax.annotate("ensemble", (m["flops"], m["accuracy"][split]), fontsize=7)
    chosen = result["results"][split]
    ax.plot(chosen["flops"], chosen["accuracy"], "*", markersize=14, color="tab:red")
    ax.annotate(
        f"selected on {result['select_on']}",
        (chosen["flops"], chosen["accuracy"]),
        xytext=(-10, -14),
        textcoords="offset points",
        ha="right",
    )
    ax.set_xscale("log")
    ax.set_xlabel("average FLOPs per image")
    ax.set_ylabel(f"{split} accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, output_dir: Path) -> dict[str, Path]:
    """cascade_<split>.json and .png in `output_dir`; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: output_dir / f"cascade_{result['split']}.{ext}" for ext in ("json", "png")}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    plot(result, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "members", nargs="+", help="Workdirs, cheapest first; RUN_X+RUN_Y: ensemble."
    )
    parser.add_argument("--split", default="test", help="Split the cascade is reported on.")
    parser.add_argument("--thresholds", default="auto", help="auto, or comma-separated in [0, 1].")
    parser.add_argument("--select_on", default="val", help="Split thresholds are selected on.")
    parser.add_argument("--checkpoint", default="best", help="best | latest | a step number.")
    parser.add_argument("--output_dir", default=None, help="Default: the first run's workdir.")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # Orbax warns about every read-only directory.
    first = member_workdirs(args.members[0])[0]
    try:
        host.prepare(workdir_lib.read_config(first))  # CPU devices, before JAX starts.
        result = cascade(args.members, args.split, args.thresholds, args.select_on, args.checkpoint)
    except (FileNotFoundError, ValueError, checkpoint_lib.CheckpointError) as error:
        command_line.report(error)  # The message says what to change; no traceback.
    print(format_table(result))
    paths = write(result, Path(args.output_dir) if args.output_dir else first)
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
