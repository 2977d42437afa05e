"""One results table over several sweeps: `python -m cnn_lab.report <sweep_dir> <sweep_dir> ...`.

Reads each sweep's runs.csv, sweep.json and its runs' metrics.jsonl, config.json and
evaluation files (never the code that trained them) and writes one row per sweep point:
the config and the point's overrides (the sweep's base overrides included, the seed left
out), parameters, test accuracy mean +- sample std over the finished seeds (with n), the EMA's
and Polyak average's test accuracy where the runs kept them, the wall time of a run (the sum
of each epoch's `epoch_seconds`, from the last validation record of each epoch, so that a
resumed epoch counts once; the fastest seed's, as a run slowed by other jobs on the machine
says nothing about the config) and the published figure.

Extra rows, where `python -m cnn_lab.evaluate` left its files in the runs' workdirs:
`snapshots(m)` from `eval_<checkpoint>_test.json` (the snapshot ensemble of each seed, mean
over seeds) and `ensemble(k)` from `ensemble_<checkpoint>_test.json` (a model ensemble).

The published figure comes from the sweep config's `get_report()`, key "published": a text
for every point, or {conditions: text} where conditions is "" (every point) or
comma-separated `field=value` pairs the point's overrides must match
("model.depth=56"); the match with the most pairs wins.
"""

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from cnn_lab import sweep
from cnn_lab import workdir as workdir_lib
from cnn_lab.tools import report

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"  # --readme's markers.
COLUMNS = (
    "sweep",
    "config",
    "point",
    "parameters",
    "finished",
    "runs",
    "test_accuracy",
    "test_accuracy_std",
    "ema_accuracy",
    "polyak_accuracy",
    "wall_seconds",
    "published",
)


def wall_seconds(workdir: Path) -> float:
    """Training and validation time of a run: `epoch_seconds` summed over its epochs (NaN if none)."""
    last_of_epoch = {
        r["epoch"]: r for r in workdir_lib.read_metrics(workdir) if r["split"] == "val"
    }
    seconds = [r["epoch_seconds"] for r in last_of_epoch.values() if "epoch_seconds" in r]
    return math.fsum(seconds) if seconds else math.nan


def published_text(published: str | dict, overrides: sweep.Overrides) -> str:
    """The get_report() "published" entry that applies to a point (see the module docstring)."""
    if isinstance(published, str):
        return published
    best, text = -1, ""
    for conditions, candidate in published.items():
        pairs = [c.split("=", 1) for c in conditions.split(",") if c]
        matches = all(sweep.flag_value(overrides.get(k.strip(), "")) == v.strip() for k, v in pairs)
        if matches and len(pairs) > best:
            best, text = len(pairs), candidate
    return text


def _point_name(overrides: sweep.Overrides) -> str:
    fields = [f for f in sweep.named_fields(overrides) if f != report.SEED]
    return ", ".join(f"{f}={sweep.flag_value(overrides[f])}" for f in fields) or "-"


def _mean(values: list[float]) -> float:
    return report.summarise(values)["mean"]


def _fastest(seconds: list[float]) -> float:
    finished = [s for s in seconds if not math.isnan(s)]
    return min(finished) if finished else math.nan


def _newest(workdir: Path, pattern: str) -> dict | None:
    """The newest evaluation file matching `pattern` in a workdir, read; None if there is none."""
    files = sorted(workdir.glob(pattern), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def _snapshot_rows(workdir: Path) -> list[dict]:
    """The snapshot-ensemble rows of the newest eval_*_test.json that has one (none: [])."""
    for path in sorted(workdir.glob("eval_*_test.json"), key=lambda p: -p.stat().st_mtime):
        rows = json.loads(path.read_text())["rows"]
        snapshots = [r for r in rows if r["model"].startswith("snapshots(")]
        if snapshots:
            return snapshots
    return []


def _summary_cells(values: list[float]) -> dict:
    summary = report.summarise(values)
    return {
        "runs": summary["runs"],
        "finished": summary["finished"],
        "test_accuracy": summary["mean"],
        "test_accuracy_std": summary["std"],
    }


def sweep_rows(sweep_dir: Path) -> list[dict]:
    """The table's rows of one sweep: each point, then its snapshot and model ensembles."""
    spec = report.report_spec(sweep_dir)
    sweep_spec = json.loads((sweep_dir / sweep.SPEC_FILE).read_text())
    config_name = Path(sweep_spec["config"].split(":", 1)[0]).stem
    base = workdir_lib.tuples(sweep_spec.get("base", {}))
    points: dict[str, list[dict]] = {}
    for index_row in sweep.read_index(sweep_dir):
        run_dir = sweep_dir / index_row["workdir"]
        overrides = base | index_row["overrides"]
        metrics = sweep.final_metrics(run_dir)
        run = {"dir": run_dir, "overrides": overrides, "metrics": metrics or {}}
        run["metrics"]["wall_seconds"] = wall_seconds(run_dir) if metrics else math.nan
        run["parameters"] = report.parameter_count(run_dir)
        points.setdefault(_point_name(overrides), []).append(run)
    by_dir = {run["dir"].name: run for runs in points.values() for run in runs}
    rows = []
    for name, runs in points.items():
        common = {
            "sweep": sweep_dir.name,
            "config": config_name,
            "point": name,
            "parameters": next((r["parameters"] for r in runs if r["parameters"]), None),
            "published": published_text(spec.get("published", ""), runs[0]["overrides"]),
        }

        def mean(key: str, runs: list[dict] = runs) -> float:
            return _mean([r["metrics"].get(key, math.nan) for r in runs])

        rows.append(
            common
            | _summary_cells([r["metrics"].get("test_accuracy", math.nan) for r in runs])
            | {
                "ema_accuracy": mean("test_ema_accuracy"),
                "polyak_accuracy": mean("test_polyak_accuracy"),
                "wall_seconds": _fastest([r["metrics"]["wall_seconds"] for r in runs]),
            }
        )
        snapshots = [(run, row) for run in runs for row in _snapshot_rows(run["dir"])]
        if snapshots:
            rows.append(
                common
                | _summary_cells([row["accuracy"] for _, row in snapshots])
                | {
                    "point": f"{name}: {snapshots[0][1]['model']}",
                    "wall_seconds": _fastest([r["metrics"]["wall_seconds"] for r, _ in snapshots]),
                }
            )
        for run in runs:
            ensemble = _newest(run["dir"], "ensemble_*_test.json")
            for row in (ensemble or {"rows": []})["rows"]:
                if row["model"].startswith("ensemble("):
                    members = [by_dir.get(Path(w).name) for w in ensemble["workdirs"]]
                    names = [Path(w).name for w in ensemble["workdirs"]]
                    rows.append(_ensemble_row(common, row, names, [m for m in members if m]))
    return rows


def _ensemble_row(common: dict, row: dict, names: list[str], members: list[dict]) -> dict:
    """A model ensemble's row: its accuracy; its members' parameters and wall times summed.

    Named by the members' point and seeds where they share a point, else by their workdirs.
    """
    points = {_point_name(m["overrides"]) for m in members}
    if len(points) == 1 and len(members) == len(names):
        seeds = ", ".join(str(m["overrides"].get(report.SEED, "-")) for m in members)
        point = f"{points.pop()}: {row['model']} of seeds {seeds}"
    else:
        point = f"{row['model']}: {', '.join(names)}"
    return common | {
        "point": point,
        "parameters": sum(m["parameters"] or 0 for m in members) or None,
        "runs": 1,
        "finished": 1,
        "test_accuracy": row["accuracy"],
        "test_accuracy_std": math.nan,
        "wall_seconds": math.fsum(m["metrics"]["wall_seconds"] for m in members)
        if members
        else math.nan,
    }


def results_rows(sweep_dirs: Sequence[str | Path]) -> list[dict]:
    """The rows of every sweep, in the order given (files skipped); FileNotFoundError for a
    directory that is no sweep."""
    rows = []
    for sweep_dir in map(Path, sweep_dirs):
        if sweep_dir.is_file():  # The table itself, matched by a shell glob (runs/fmnist/*).
            continue
        if (
            not (sweep_dir / sweep.INDEX_FILE).exists()
            or not (sweep_dir / sweep.SPEC_FILE).exists()
        ):
            raise FileNotFoundError(
                f"{sweep_dir} has no {sweep.INDEX_FILE} and {sweep.SPEC_FILE}. Pass the "
                "--sweep_dir of `python -m launch.sweep` (or of `python -m cnn_lab.baseline`)."
            )
        rows += sweep_rows(sweep_dir)
    return rows


def _accuracy_text(row: dict) -> str:
    """The mean +- std (n=finished), with "of <runs>" while some runs have not finished."""
    of = "" if row["finished"] == row["runs"] else f" of {row['runs']}"
    count = f"(n={row['finished']}{of})"
    if math.isnan(row["test_accuracy"]):
        return f"- {count}"
    std = row.get("test_accuracy_std", math.nan)
    spread = "" if math.isnan(std) else f" +- {std:.4f}"
    return f"{row['test_accuracy']:.4f}{spread} {count}"


def _optional(value: float | None, form: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, form)


def markdown(rows: list[dict]) -> str:
    """The rows as one Markdown table."""
    lines = [
        "| sweep | config | point | parameters | test accuracy | EMA | Polyak "
        "| wall time / run (fastest) | published |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        minutes = row.get("wall_seconds", math.nan) / 60
        cells = [
            row["sweep"],
            f"`{row['config']}`",
            row["point"],
            _optional(row["parameters"], ","),
            _accuracy_text(row),
            _optional(row.get("ema_accuracy"), ".4f"),
            _optional(row.get("polyak_accuracy"), ".4f"),
            "-" if math.isnan(minutes) else f"{minutes:.1f} min",
            row["published"] or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def replace_in_readme(readme: Path, table: str) -> None:
    """Put `table` between the BEGIN and END markers of `readme`; ValueError without them."""
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(
            f"--readme={readme} has no {BEGIN} ... {END} pair (in that order). Add the two "
            "lines where the results table goes; the report replaces what is between them."
        )
    readme.write_text(text[: start + len(BEGIN)] + "\n" + table + text[end:])


def write_results(
    sweep_dirs: Sequence[str | Path], out: str | Path, readme: str | Path | None = None
) -> dict[str, Path]:
    """Write <out>.md and <out>.csv (and the table into `readme`); returns their paths."""
    rows = results_rows(sweep_dirs)
    table = markdown(rows)
    paths = {ext: Path(f"{out}.{ext}") for ext in ("md", "csv")}
    paths["md"].write_text(table)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    c: "" if row.get(c) is None or row.get(c) != row.get(c) else row[c]
                    for c in COLUMNS
                }
            )
    if readme is not None:
        replace_in_readme(Path(readme), table)
        paths["readme"] = Path(readme)
    return paths
