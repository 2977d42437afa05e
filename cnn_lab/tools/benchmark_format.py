"""The benchmark's figures as tables a person can read, with ratios to a saved run."""

from cnn_lab.runtime import memory


def format_pipeline(r: dict) -> str:
    """A few lines a person can read."""
    lines = [f"{r['model']} on {r['data']}, batch {r['batch_size']}: input pipelines"]
    for mode in ("device", "streaming"):
        if mode not in r:
            continue
        m = r[mode]
        lines.append(
            f"  {mode:<9}: first batch {m['first_batch_seconds']:.1f} s; input alone "
            f"{m['input_examples_per_second']:.0f} img/s; train {m['train_steps_per_second_real']:.2f}"
            f" steps/s real vs {m['train_steps_per_second_synthetic']:.2f} synthetic "
            f"({100 * m['real_over_synthetic']:.0f}%)"
        )
    return "\n".join(lines)


# (label, path into the result, format) of each figure in the table and the comparison.
FIGURES = (
    ("matmul peak GFLOP/s", ("matmul_peak_gflops", "median"), "{:.1f}"),
    ("train img/s", ("train_images_per_second", "median"), "{:.0f}"),
    ("train GFLOP/s", ("train", "gflops"), "{:.1f}"),
    ("train % of peak", ("train", "percent_of_peak"), "{:.1f}"),
    ("eval img/s", ("eval_images_per_second", "median"), "{:.0f}"),
    ("eval GFLOP/s", ("eval", "gflops"), "{:.1f}"),
    ("eval % of peak", ("eval", "percent_of_peak"), "{:.1f}"),
    ("train compile s", ("compile_seconds",), "{:.1f}"),
    ("peak host memory MB", ("peak_host_memory_mb",), "{:.0f}"),
    ("training peak MB", ("host_memory", "phases", "training", "peak_mb"), "{:.0f}"),
    ("checkpoint save ms", ("checkpoint_total_ms",), "{:.0f}"),
    ("checkpoint restore ms", ("checkpoint_restore_ms",), "{:.0f}"),
)


def _figure(result: dict, path: tuple[str, ...]) -> float | None:
    """The figure at `path`; None where `result` (e.g. a JSON saved by an older version) lacks it."""
    for key in path:
        if key not in result:
            return None
        result = result[key]
    return result


def format_result(r: dict, baseline: dict | None = None) -> str:
    """A table a person can read; with `baseline`, each figure's ratio to it."""
    t, e = r["train_images_per_second"], r["eval_images_per_second"]
    lines = [
        f"{r['model']} {tuple(r['image_shape'])}, {r['parameters']:,} params, "
        f"{r['devices']} {r['device_kind']} device(s), "
        f"{r.get('conv_implementation', 'xla')} convolution; train batch {r['batch_size']} "
        f"[{t['min']:.0f}-{t['max']:.0f} img/s], eval batch {r['eval_batch_size']} "
        f"[{e['min']:.0f}-{e['max']:.0f} img/s]",
        f"  {'figure':<22}{'value':>10}" + (f"{'baseline':>10}{'ratio':>8}" if baseline else ""),
    ]
    for label, path, fmt in FIGURES:
        value = _figure(r, path)
        if value is None:  # A result saved by an older version.
            continue
        line = f"  {label:<22}{fmt.format(value):>10}"
        old = _figure(baseline, path) if baseline else None
        if old is not None:
            line += f"{fmt.format(old):>10}{value / old:>8.2f}"
        lines.append(line)
    if "host_memory" in r:  # Absent from results saved by older versions.
        lines.append(memory.format_breakdown(r["host_memory"]))
    return "\n".join(lines)
