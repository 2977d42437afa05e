"""Summarise a sweep: `python -m cnn_lab.report <sweep_dir> [--metric=test_accuracy]`.

Reads the sweep's runs.csv and each run's metrics.jsonl (never the code that trained them)
and writes, into the sweep directory, report_<metric>.md and .csv (mean +- sample standard
deviation over seeds, per point and per value of each axis) and report_<metric>.png (the
metric against each axis: every run as a dot, the mean with +- std bars).

Each point also gets its parameter count, from the model its runs' config.json describe.
When the sweep's config file defines `get_report()` -> {"baseline": a point's label,
"reference": {"title": column title, label: text, ...}} (see
configs/alexnet_depth_ablation.py), or with --baseline=<label>, each point adds the
parameters it drops and its change in the metric against the baseline point, and the
reference column beside them.

Several sweep directories (or --readme, --out) give instead one table over all of them, a
row per point with the published figure beside it: see cnn_lab.tools.results.
"""

import csv
import functools
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from cnn_lab import sweep
from cnn_lab import workdir as workdir_lib

SEED = "seed"  # The axis averaged over.


def load_runs(sweep_dir: Path, metric: str) -> list[dict]:
    """Every run of runs.csv: {"overrides", "finished", "value"} (value NaN until finished)."""
    rows = sweep.read_index(sweep_dir)
    if not rows:
        raise FileNotFoundError(
            f"{sweep_dir} has no {sweep.INDEX_FILE}. Pass the --sweep_dir of a sweep started "
            "with `python -m launch.sweep`."
        )
    runs, available = [], set()
    for row in rows:
        metrics = sweep.final_metrics(sweep_dir / row["workdir"])
        available |= set(metrics or ())
        value = (metrics or {}).get(metric, math.nan)
        runs.append(
            {
                "overrides": row["overrides"],
                "finished": metrics is not None,
                "value": value,
                "parameters": parameter_count(sweep_dir / row["workdir"]),
            }
        )
    if available and metric not in available:
        raise ValueError(
            f"No run recorded --metric={metric}. Choose one of: {', '.join(sorted(available))}."
        )
    return runs


def parameter_count(workdir: Path) -> int | None:
    """Parameters of the run's model: its test record's `parameters` where it wrote one (a
    baseline), else counted from its config.json; None before the run wrote it."""
    recorded = (sweep.final_metrics(workdir) or {}).get("test_parameters")
    if recorded is not None:
        return int(recorded)
    if not (workdir / workdir_lib.CONFIG_FILE).exists():
        return None
    return _count(json.dumps(workdir_lib.read_config(workdir).to_dict(), default=list))


@functools.cache
def _count(config_json: str) -> int:
    """summary.parameter_count, once per distinct config (the seeds of a point share one)."""
    from cnn_lab.tools import summary  # JAX loads only for runs that have a model to count.

    config = ml_collections.ConfigDict(workdir_lib.tuples(json.loads(config_json)))
    return summary.parameter_count(config)


def report_spec(sweep_dir: Path, baseline: str | None = None) -> dict:
    """{"baseline": label or None, "reference": {"title": ..., label: text}} for the report:
    the sweep config's get_report() (if it defines one), its baseline replaced by `baseline`."""
    spec: dict = {"baseline": None, "reference": {}}
    path = sweep_dir / sweep.SPEC_FILE
    if path.exists():
        config_file = json.loads(path.read_text())["config"]
        if Path(config_file.split(":", 1)[0]).exists():  # Else run from elsewhere: no extras.
            module = sweep.config_module(config_file)
            spec |= module.get_report() if hasattr(module, "get_report") else {}
    if baseline is not None:
        spec["baseline"] = baseline
    return spec


def axes_of(runs: list[dict]) -> list[str]:
    """The overridden fields other than the seed that take more than one value."""
    named = (k for run in runs for k in sweep.named_fields(run["overrides"]))
    fields = [k for k in dict.fromkeys(named) if k != SEED]
    varying = [f for f in fields if len({repr(r["overrides"].get(f)) for r in runs}) > 1]
    return varying or fields


def summarise(values: Sequence[float]) -> dict:
    """{"runs", "finished", "mean", "std"} of the finished runs' values (std: n - 1, NaN if n < 2)."""
    done = [v for v in values if not math.isnan(v)]
    return {
        "runs": len(values),
        "finished": len(done),
        "mean": statistics.fmean(done) if done else math.nan,
        "std": statistics.stdev(done) if len(done) > 1 else math.nan,
    }


def _hashable(value):
    """`value`, or its JSON text when it cannot be a dict key (e.g. a tuple of phase dicts)."""
    try:
        hash(value)
    except TypeError:
        return json.dumps(value, sort_keys=True)
    return value


def group(runs: list[dict], fields: Sequence[str]) -> dict[tuple, list[float]]:
    """Run values grouped by their values of `fields`, in first-seen order."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        key = tuple(_hashable(run["overrides"].get(f)) for f in fields)
        groups.setdefault(key, []).append(run["value"])
    return groups


def fields_of(runs: list[dict]) -> list[str]:
    """The fields naming the points (seed aside): the columns of the table of points."""
    named = (k for r in runs for k in sweep.named_fields(r["overrides"]))
    return [f for f in dict.fromkeys(named) if f != SEED]


def tables(runs: list[dict], baseline: str | None = None) -> list[dict]:
    """Rows of the report: one per point (over seeds), then one per value of each axis.

    Points carry their "parameters" (None where unknown) and, given the `baseline` point's
    label, "parameters_dropped" and "change" (of the mean) against it.
    """
    axes = axes_of(runs)
    point_fields = fields_of(runs)
    parameters = group([{**r, "value": r.get("parameters")} for r in runs], point_fields)
    rows = [
        {
            "scope": "point",
            **dict(zip(point_fields, key, strict=True)),
            **summarise(values),
            "parameters": parameters[key][0],
        }
        for key, values in group(runs, point_fields).items()
    ]
    if baseline is not None:
        _compare(rows, baseline)
    for field in axes:
        rows += [
            {"scope": f"axis {field}", field: key[0], **summarise(values)}
            for key, values in group(runs, [field]).items()
        ]
    return rows


def _compare(points: list[dict], baseline: str) -> None:
    """Add to each point its parameters dropped and its change against the `baseline` point."""
    base = next((p for p in points if p.get(sweep.LABEL) == baseline), None)
    if base is None:
        labels = [p[sweep.LABEL] for p in points if p.get(sweep.LABEL) is not None]
        raise ValueError(
            f"--baseline={baseline}: no point of the sweep has that label. Its labels: "
            f"{', '.join(map(str, labels)) or 'none (get_sweep() gives no labels)'}."
        )
    for point in points:
        known = point["parameters"] is not None and base["parameters"] is not None
        point["parameters_dropped"] = base["parameters"] - point["parameters"] if known else None
        point["change"] = point["mean"] - base["mean"]


def _text(value: object) -> str:
    """An override value as the command line spells it; blank where a row has none."""
    return "" if value is None else sweep.flag_value(value)


def _mean_std(row: dict) -> str:
    if math.isnan(row["mean"]):
        return "-"
    return f"{row['mean']:.4f}" + (f" +- {row['std']:.4f}" if not math.isnan(row["std"]) else "")


def _point_columns(rows: list[dict], metric: str, spec: dict) -> dict[str, object]:
    """The point table's columns after the fields: {title: row -> cell text}."""
    points = [r for r in rows if r["scope"] == "point"]
    columns = {
        "finished/runs": lambda r: f"{r['finished']}/{r['runs']}",
        metric: _mean_std,
    }
    if any(r["parameters"] is not None for r in points):
        columns["parameters"] = lambda r: _count_text(r["parameters"])
    if spec["baseline"] is not None:
        columns[f"dropped vs {spec['baseline']}"] = lambda r: _count_text(r["parameters_dropped"])
        columns[f"change vs {spec['baseline']}"] = lambda r: (
            "-" if math.isnan(r["change"]) else f"{r['change']:+.4f}"
        )
    reference = dict(spec["reference"])
    if reference:
        title = reference.pop("title", "reference")
        columns[title] = lambda r: str(reference.get(r.get(sweep.LABEL), ""))
    return columns


def _count_text(count: int | None) -> str:
    return "-" if count is None else f"{count:,}"


def markdown(
    sweep_dir: Path, metric: str, rows: list[dict], fields: list[str], spec: dict | None = None
) -> str:
    """The report as Markdown: a table of points, then one table per axis."""
    columns = _point_columns(rows, metric, spec or {"baseline": None, "reference": {}})
    lines = [
        f"# {sweep_dir.name}: {metric}",
        "",
        "mean +- sample standard deviation over seeds; `finished/runs` counts the runs "
        "that trained to the end.",
        "",
        "## Points",
        "",
        "| " + " | ".join([*fields, *columns]) + " |",
        "|" + "---|" * (len(fields) + len(columns)),
    ]
    for row in (r for r in rows if r["scope"] == "point"):
        cells = [_text(row.get(f)) for f in fields] + [cell(row) for cell in columns.values()]
        lines.append("| " + " | ".join(cells) + " |")
    for scope in dict.fromkeys(r["scope"] for r in rows if r["scope"] != "point"):
        field = scope.removeprefix("axis ")
        lines += ["", f"## {field}", "", f"| {field} | finished/runs | {metric} |", "|---|---|---|"]
        for row in (r for r in rows if r["scope"] == scope):
            lines.append(
                f"| {_text(row[field])} | {row['finished']}/{row['runs']} | {_mean_std(row)} |"
            )
    return "\n".join(lines) + "\n"


def plot(path: Path, metric: str, runs: list[dict], axes: list[str]) -> None:
    """The metric against each axis: runs as dots, means with +- std bars."""
    import matplotlib

    matplotlib.use("Agg")  # Files only.
    import matplotlib.pyplot as plt

    axes = axes or [SEED]
    fig, panels = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.6), squeeze=False)
    for panel, field in zip(panels[0], axes, strict=True):
        groups = group(runs, [field])
        keys = [k[0] for k in groups]
        numeric = all(isinstance(k, int | float) and not isinstance(k, bool) for k in keys)
        order = sorted(range(len(keys)), key=lambda i: keys[i]) if numeric else range(len(keys))
        xs = [keys[i] if numeric else n for n, i in enumerate(order)]
        values = [list(groups.values())[i] for i in order]
        for x, vals in zip(xs, values, strict=True):
            panel.plot([x] * len(vals), vals, "o", color="tab:blue", alpha=0.35, markersize=4)
        stats = [summarise(v) for v in values]
        panel.errorbar(
            xs,
            [s["mean"] for s in stats],
            yerr=[0.0 if math.isnan(s["std"]) else s["std"] for s in stats],
            fmt="-s",
            color="tab:red",
            capsize=4,
            label="mean +- std",
        )
        if not numeric:
            panel.set_xticks(xs, [str(keys[i]) for i in order])
        panel.set_xlabel(field)
        panel.set_ylabel(metric)
        panel.grid(alpha=0.3)
        panel.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    sweep_dir: str | Path, metric: str = "test_accuracy", baseline: str | None = None
) -> dict[str, Path]:
    """Write report_<metric>.{md,csv,png} into the sweep directory; returns their paths.

    `baseline`: the label of the point the others are compared with (default: the sweep
    config's get_report(), or none).
    """
    sweep_dir = Path(sweep_dir)
    spec = report_spec(sweep_dir, baseline)
    runs = load_runs(sweep_dir, metric)
    rows = tables(runs, spec["baseline"])
    fields = fields_of(runs)
    paths = {ext: sweep_dir / f"report_{metric}.{ext}" for ext in ("md", "csv", "png")}
    paths["md"].write_text(markdown(sweep_dir, metric, rows, fields, spec))
    with open(paths["csv"], "w", newline="") as f:
        extra = [c for c in ("parameters", "parameters_dropped", "change") if c in rows[0]]
        columns = ["scope", *fields, "runs", "finished", "mean", "std", *extra]
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    plot(paths["png"], metric, runs, axes_of(runs))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring (several sweeps: cnn_lab.tools.results)."""
    import argparse

    from cnn_lab.tools import results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dirs", nargs="+", help="The --sweep_dir of `python -m launch.sweep` (one or more)."
    )
    parser.add_argument("--metric", default="test_accuracy", help="A column of runs.csv.")
    parser.add_argument(
        "--baseline", default=None, help="Label of the point to compare with (get_sweep labels)."
    )
    parser.add_argument(
        "--out",
        default=None,
        help="Several sweeps (or --readme): write <out>.md and <out>.csv (default: "
        "results.md and .csv beside the first sweep directory).",
    )
    parser.add_argument(
        "--readme",
        default=None,
        help=f"Also put the table of several sweeps between {results.BEGIN} and {results.END} "
        "in this file.",
    )
    args = parser.parse_args(argv)
    try:
        if len(args.sweep_dirs) > 1 or args.readme or args.out:
            out = args.out or Path(args.sweep_dirs[0]).resolve().parent / "results"
            paths = results.write_results(args.sweep_dirs, out, args.readme)
        else:
            paths = write_report(args.sweep_dirs[0], args.metric, args.baseline)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(paths["md"].read_text())
    print("Wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
