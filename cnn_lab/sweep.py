"""Sweeps as data: override grids, the workdir named by each point, its result, and runs.csv.

A config file may define `get_sweep()` beside `get_config()`, returning override dicts:

    from cnn_lab import sweep

    def get_sweep():
        return sweep.product(sweep.axis("model.depth", [20, 56]), sweep.seeds(3))

Standard library only: config files import this module.
"""

import ast
import contextlib
import csv
import fcntl
import importlib.util
import itertools
import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

from cnn_lab.workdir import CONFIG_FILE, METRICS_FILE, read_metrics, tuples

Overrides = dict[str, object]  # {"model.depth": 20, "seed": 0}: config field -> value.
# A point may carry {"label": "finetune"}: not a config field, it names the point (its workdir
# and its row in the report) in place of overrides too long to read (tuples, dicts).
LABEL = "label"

INDEX_FILE = "runs.csv"
# {"config": file[:mode], "base": overrides of every point, "points": [...]}, by launch.sweep.
SPEC_FILE = "sweep.json"
# Index columns before the final metrics; `status`: pending | queued | running | done |
# preempted | failed | interrupted.
INDEX_COLUMNS = ("workdir", "overrides", "status", "exit_code")
# What cnn_lab.report reads of a finished run: a few kilobytes, where its checkpoints are
# megabytes. Records copied off a machine outlive it, and copied back they mark the run done.
RECORD_PATTERNS = (CONFIG_FILE, METRICS_FILE, "eval_*.json", "ensemble_*.json")


def config_module(config_file: str) -> ModuleType:
    """The config file `config_file` (path[:mode]) loaded as a module: its get_config(), and
    get_sweep() and get_report() where it defines them."""
    path = config_file.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def axis(field: str, values: Iterable) -> list[Overrides]:
    """One override dict per value of a config `field`: axis("model.depth", [20, 56])."""
    return [{field: value} for value in values]


def seeds(count: int) -> list[Overrides]:
    """The seed axis 0 .. count - 1."""
    return axis("seed", range(count))


def _merge(parts: Sequence[Overrides]) -> Overrides:
    merged: Overrides = {}
    for part in parts:
        clash = merged.keys() & part.keys()
        if clash:
            raise ValueError(
                f"Sweep axes set the same config field twice ({', '.join(sorted(clash))}). "
                "Give each field one axis (combine its values in one list)."
            )
        merged |= part
    return merged


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
    """Every combination of one point from each sweep (the first varies slowest)."""
    return [_merge(parts) for parts in itertools.product(*sweeps)]


def zipped(*sweeps: Sequence[Overrides]) -> list[Overrides]:
    """Points taken side by side: zipped(axis("a", [1, 2]), axis("b", [3, 4])) -> a=1,b=3; a=2,b=4."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(
            f"sweep.zipped needs sweeps of one length, got lengths {sorted(lengths)}. "
            "Use sweep.product for every combination."
        )
    return [_merge(parts) for parts in zip(*sweeps, strict=True)]


def parse_axis(spec: str) -> list[Overrides]:
    """`--axis` text "model.depth=20,56" -> axis("model.depth", [20, 56]).

    Values are Python literals ("0.5", "True", "(0.5,)") or else plain strings ("sgd,adam").
    """
    field, sep, values = spec.partition("=")
    if not sep or not field or not values:
        raise ValueError(
            f"--axis={spec!r} is not FIELD=VALUE[,VALUE...]. Example: --axis=model.depth=20,56."
        )
    try:
        parsed = ast.literal_eval(f"[{values}]")
    except (ValueError, SyntaxError):
        parsed = values.split(",")
    return axis(field.strip(), parsed)


def named_fields(overrides: Overrides) -> list[str]:
    """The fields that name a point: all, or with a label, the label and the scalar ones."""
    if LABEL not in overrides:
        return list(overrides)
    scalar = (int, float, str, bool)
    return [LABEL, *(k for k, v in overrides.items() if k != LABEL and isinstance(v, scalar))]


def workdir_name(overrides: Overrides) -> str:
    """A directory name saying what a point overrides: "model.depth=20,seed=0" ("base" for none)."""
    if not overrides:
        return "base"
    text = ",".join(f"{k}={overrides[k]}" for k in named_fields(overrides))
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def flag_value(value: object) -> str:
    """The command-line text of an override value, as ml_collections' config flags parse it."""
    return repr(value) if isinstance(value, tuple | list) else str(value)


def override_flags(overrides: Overrides) -> list[str]:
    """["--config.model.depth=20", "--config.seed=0"] for {"model.depth": 20, "seed": 0}."""
    return [
        f"--config.{field}={flag_value(value)}"
        for field, value in overrides.items()
        if field != LABEL
    ]


def final_metrics(workdir: str | Path) -> dict[str, float] | None:
    """The metrics of a finished run ("test_accuracy", "val_loss", "step"...), else None.

    A run is finished when its metrics.jsonl holds a test record: training writes it last,
    and drops it when a run resumes.
    """
    records = read_metrics(workdir)
    test = [r for r in records if r["split"] == "test"]
    if not test:
        return None
    val = [r for r in records if r["split"] == "val"]
    metrics = {"step": test[-1]["step"]}
    for split, record in (("val", val[-1] if val else {}), ("test", test[-1])):
        for name, value in record.items():
            if name not in ("step", "epoch", "split") and isinstance(value, int | float):
                metrics[f"{split}_{name}"] = value
    return metrics


def started(workdir: str | Path) -> bool:
    """True once a run has written anything a rerun resumes from."""
    return (Path(workdir) / METRICS_FILE).exists() or (Path(workdir) / "checkpoints").exists()


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    """Exclusive access to runs.csv across threads, processes and SLURM array tasks."""
    with open(sweep_dir / (INDEX_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_index(sweep_dir: str | Path) -> list[dict]:
    """runs.csv as rows; `overrides` parsed back into a dict, metrics into floats."""
    path = Path(sweep_dir) / INDEX_FILE
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["overrides"] = tuples(json.loads(row["overrides"]))
        for column in row.keys() - set(INDEX_COLUMNS):
            row[column] = _number(row[column])
    return rows


def _number(text: str | None) -> float | int:
    if text in ("", None):
        return math.nan
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _write_index(sweep_dir: Path, rows: list[dict]) -> None:
    metric_columns = sorted({c for row in rows for c in row} - set(INDEX_COLUMNS))
    tmp = sweep_dir / (INDEX_FILE + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*INDEX_COLUMNS, *metric_columns])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **{
                        c: "" if isinstance(v, float) and math.isnan(v) else v
                        for c, v in row.items()
                    },
                    "overrides": json.dumps(row["overrides"]),
                }
            )
    tmp.replace(sweep_dir / INDEX_FILE)  # Readers never see a half-written index.


def update_index(
    sweep_dir: str | Path, workdir: str, overrides: Overrides, status: str, exit_code: str = ""
) -> None:
    """Record a point's status (and, when its run finished, its final metrics) in runs.csv."""
    sweep_dir = Path(sweep_dir)
    with _locked(sweep_dir):
        rows = {row["workdir"]: row for row in read_index(sweep_dir)}
        row = {"workdir": workdir, "overrides": overrides, "status": status}
        row["exit_code"] = exit_code
        row |= final_metrics(sweep_dir / workdir) or {}
        rows[workdir] = row
        _write_index(sweep_dir, list(rows.values()))


def copy_records(source: str | Path, target: str | Path) -> list[str]:
    """Copy a sweep's records (no checkpoints) from `source` to `target`; returns the runs copied.

    Each run finished in `source` is copied whole unless `target` holds it finished already;
    then it only gains the evaluation files it lacks, so records are never overwritten.
    `target`'s runs.csv lists every run of `source`'s, and its sweep.json is `source`'s where
    that lists every point of its own (a grown sweep).
    """
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if (source / SPEC_FILE).exists() and all(point in _points(source) for point in _points(target)):
        shutil.copyfile(source / SPEC_FILE, target / SPEC_FILE)
    listed = {row["workdir"]: row for row in read_index(target)}
    copied = []
    for row in read_index(source):
        name = row["workdir"]
        finished = final_metrics(source / name) is not None
        complete = final_metrics(target / name) is not None
        if finished:
            files = [f for pattern in RECORD_PATTERNS for f in (source / name).glob(pattern)]
            fresh = [f for f in files if not (complete and (target / name / f.name).exists())]
            (target / name).mkdir(exist_ok=True)
            for file in fresh:
                shutil.copyfile(file, target / name / file.name)
            copied += [name] if fresh else []
        if name not in listed or listed[name]["status"] != "done":
            done = finished or complete  # A finished run was just copied, if not there.
            status = "done" if done else row["status"]
            update_index(target, name, row["overrides"], status, "0" if done else row["exit_code"])
    return copied


def _points(sweep_dir: Path) -> list[Overrides]:
    path = sweep_dir / SPEC_FILE
    return json.loads(path.read_text())["points"] if path.exists() else []
