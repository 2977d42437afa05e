"""Measure a config's speed against the machine: `python -m cnn_lab.benchmark --config=...`.

One run measures the machine's float32 matmul throughput (the reference peak), the train and
eval steps on synthetic batches already on the devices (images/s, compile time, GFLOP/s from
XLA's cost analysis and as a share of the peak), host memory per phase (`runtime.memory`) and
the cost of a checkpoint save. `--pipeline` measures the input pipelines instead, on the
config's real data; `--compare=<saved.json>` prints the ratio of each figure to an earlier run.
Figures are medians over timed windows after warm-up, with their spread.
"""

import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax import lax

from cnn_lab import checkpoint, command_line, loss_scaling, optim, steps
from cnn_lab.data import augment, inputs
from cnn_lab.models import conv_implementation, get_model
from cnn_lab.runtime import host, memory, sharding
from cnn_lab.state import TrainState, init_state


def _timed_windows(run_window, windows: int) -> list[float]:
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        run_window()
        times.append(time.perf_counter() - start)
    return times


def _rate(times: list[float], units_per_window: float) -> dict[str, float]:
    values = [units_per_window / t for t in times]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, windows: int = 5) -> dict:
    """The float32 matmul GFLOP/s of one device: the reference the steps are measured against.

    A (size, size) @ (size, size) product is large enough for every core's vector units.
    """
    a = jax.random.normal(jax.random.key(0), (size, size), jax.numpy.float32)
    product = jax.jit(lambda x: x @ x)
    jax.block_until_ready(product(a))

    def window():
        for _ in range(repeats):
            out = product(a)
        jax.block_until_ready(out)

    window()
    return _rate(_timed_windows(window, windows), 2 * size**3 * repeats / 1e9)


def _flops(compiled, devices: int) -> float:
    """FLOPs of one call of `compiled` over all devices (XLA reports one device's program)."""
    return devices * float(compiled.cost_analysis()["flops"])


def _jit_train_step(config, model, tx, schedule, mesh, preprocess=None):
    """The config's train step (its gradient accumulation included), without label smoothing."""
    return steps.jit_train_step(
        model,
        tx,
        schedule,
        mesh,
        label_smoothing=0.0,
        preprocess=preprocess,
        micro_batches=config.train.grad_accumulation_steps,
    )


def _checkpoint_costs(state, windows: int) -> dict[str, float]:
    """Median ms of saving `state` (until the call returns, and until written) and of
    restoring it as a resume does (digests and finiteness checked)."""
    with tempfile.TemporaryDirectory() as directory:
        manager = checkpoint.make_manager(Path(directory), keep=2)
        blocking, total, restore = [], [], []
        for step in range(1, windows + 2):
            start = time.perf_counter()
            checkpoint.save(manager, state, step)
            blocking.append(time.perf_counter() - start)
            manager.wait_until_finished()
            total.append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(checkpoint.restore_newest_valid(manager, state))
            restore.append(time.perf_counter() - start)
        manager.close()
    # The first save also creates directories and compiles; report the steady state.
    return {
        f"checkpoint_{name}_ms": 1000 * statistics.median(times[1:])
        for name, times in (("blocking", blocking), ("total", total), ("restore", restore))
    }


def _fresh_state(config, model, tx, plateau, shape, mesh) -> TrainState:
    """The state a run of `config` starts from (float16: with its loss scale), seed 0."""
    loss_scale = loss_scaling.from_config(config.model.compute_dtype, config.train)
    return init_state(model, tx, plateau, jax.random.PRNGKey(0), shape, mesh, loss_scale=loss_scale)


def benchmark(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    eval_batch_size: int,
    steps_per_window: int = 10,
    windows: int = 5,
    matmul_size: int = 2048,
) -> dict:
    """Train/eval images/s, GFLOP/s and share of the matmul peak, compile s, memory, checkpoint ms."""
    phases = memory.Phases()
    phases.end("imports")
    peak = matmul_peak_gflops(matmul_size)
    phases.end("matmul peak")
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh, "--batch_size")
    sharding.check_batch_size(eval_batch_size, mesh, "--eval_batch_size")
    model = get_model(config.model)
    implementation = conv_implementation(model)
    # The schedule's length does not change the step's cost; any fixed one will do.
    schedule, tx, plateau = optim.from_config(config, steps_per_epoch=100, total_steps=10_000)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = _fresh_state(config, model, tx, plateau, shape, mesh)
    rng = np.random.default_rng(0)
    phases.end("state")

    def batch(n, with_mask=False):
        b = {
            "image": rng.normal(size=(n, *shape)).astype(np.float32),
            "label": rng.integers(0, config.model.num_classes, n).astype(np.int32),
        }
        if with_mask:
            b["mask"] = np.ones(n, bool)
        return jax.device_put(b, sharding.batch_sharded(mesh))

    train_step = _jit_train_step(config, model, tx, schedule, mesh)
    train_batch = batch(batch_size)
    start = time.perf_counter()
    compiled = train_step.lower(state, train_batch).compile()
    compile_seconds = time.perf_counter() - start
    host.release_freed_memory()  # As training does after its first step.
    phases.end("compile")
    holder = {"state": state}

    def train_window():
        s = holder["state"]
        for _ in range(steps_per_window):
            s, metrics = compiled(s, train_batch)
        jax.block_until_ready(metrics)
        holder["state"] = s

    train_window()  # warm-up
    train_times = _timed_windows(train_window, windows)
    phases.end("training")

    eval_batch = batch(eval_batch_size, with_mask=True)
    variables = holder["state"].variables
    eval_fn = steps.make_eval_fn(model, mesh).lower(variables, eval_batch).compile()

    def eval_window():
        for _ in range(steps_per_window):
            sums = eval_fn(variables, eval_batch)
        jax.block_until_ready(sums)

    eval_window()
    eval_times = _timed_windows(eval_window, windows)
    phases.end("eval")
    checkpoint_ms = _checkpoint_costs(holder["state"], windows)
    phases.end("checkpoint")

    train_rate = _rate(train_times, batch_size * steps_per_window)
    eval_rate = _rate(eval_times, eval_batch_size * steps_per_window)
    if implementation == "xla":
        train_flops, eval_flops = _flops(compiled, mesh.size), _flops(eval_fn, mesh.size)
    else:  # XLA's cost analysis cannot see into oneDNN's calls: count XLA's convolution instead.
        xla_model = model.clone(convolution=lax.conv_general_dilated)
        xla_step = _jit_train_step(config, xla_model, tx, schedule, mesh)
        train_flops = _flops(xla_step.lower(state, train_batch).compile(), mesh.size)
        xla_eval = steps.make_eval_fn(xla_model, mesh).lower(variables, eval_batch).compile()
        eval_flops = _flops(xla_eval, mesh.size)
    phases.end("cost analysis")
    host_memory = phases.breakdown(config.train.keep_freed_memory)

    def gflops(flops_per_image: float, rate: dict) -> dict:
        achieved = flops_per_image * rate["median"] / 1e9
        return {"gflops": achieved, "percent_of_peak": 100 * achieved / peak["median"]}

    return {
        "model": config.model.name,
        "image_shape": list(shape),
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "devices": mesh.size,
        "device_kind": mesh.devices.flat[0].device_kind,
        "conv_implementation": implementation,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "compile_seconds": compile_seconds,
        "matmul_peak_gflops": peak,
        "train_images_per_second": train_rate,
        "train_flops_per_image": train_flops / batch_size,
        "train": gflops(train_flops / batch_size, train_rate),
        "eval_images_per_second": eval_rate,
        "eval_flops_per_image": eval_flops / eval_batch_size,
        "eval": gflops(eval_flops / eval_batch_size, eval_rate),
        "peak_host_memory_mb": host_memory["peak_mb"],
        "host_memory": host_memory,
        **checkpoint_ms,
    }


def _epochs(data: inputs.Inputs):
    """Training batches of epoch 0, 1, 2, ... without end."""
    for epoch in itertools.count():
        yield from data.train_batches(epoch)


def pipeline_benchmark(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    window_seconds: float = 1.0,
    windows: int = 5,
    modes: tuple[str, ...] = ("device", "streaming"),
) -> dict:
    """Per input mode: time to first batch, input alone, and train steps/s real vs synthetic.

    The train step is the run's own (augmentation on the devices included); "synthetic" feeds
    it one uint8 batch already on the devices, so the ratio is the input's cost to training.
    Real and synthetic windows (>= `window_seconds`) alternate: a change in load hits both.
    """
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh, "--batch_size")
    model = get_model(config.model)
    schedule, tx, plateau = optim.from_config(config, steps_per_epoch=100, total_steps=10_000)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    holder = {"state": _fresh_state(config, model, tx, plateau, shape, mesh)}

    def steps_per_second(batches, train_step) -> float:
        """Train steps/s over one window of at least `window_seconds` (2 steps in flight)."""
        state, metrics, steps = holder["state"], None, 0
        start = time.perf_counter()
        while steps == 0 or time.perf_counter() - start < window_seconds:
            batch = next(batches)
            if metrics is not None:
                jax.block_until_ready(metrics)
            state, metrics = train_step(state, batch)
            steps += 1
        jax.block_until_ready(metrics)
        holder["state"] = state
        return steps / (time.perf_counter() - start)

    results = {"model": config.model.name, "data": config.data.name, "batch_size": batch_size}
    for mode in modes:
        data_config = ml_collections.ConfigDict(config.data.to_dict())
        data_config.input_mode = mode
        start = time.perf_counter()
        data = inputs.make_inputs(
            data_config, batch_size, mesh, seed=0, resized_crop=augment.crop_ranges(config.augment)
        )
        batches = _epochs(data)
        jax.block_until_ready(next(batches))
        first_batch = time.perf_counter() - start
        start, count = time.perf_counter(), 30
        for _ in range(count):
            jax.block_until_ready(next(batches))
        input_alone = count * batch_size / (time.perf_counter() - start)
        preprocess = augment.train_preprocess(config, crops_on_host=data.crops_on_host)
        train_step = _jit_train_step(config, model, tx, schedule, mesh, preprocess)
        synthetic_batches = itertools.repeat(jax.block_until_ready(next(batches)))
        holder["state"], _ = jax.block_until_ready(train_step(holder["state"], next(batches)))
        windows_real_synthetic = [
            (steps_per_second(batches, train_step), steps_per_second(synthetic_batches, train_step))
            for _ in range(windows)
        ]
        real, synthetic = map(statistics.median, zip(*windows_real_synthetic, strict=True))
        results[mode] = {
            "first_batch_seconds": first_batch,
            "input_examples_per_second": input_alone,
            "train_steps_per_second_real": real,
            "train_steps_per_second_synthetic": synthetic,
            "real_over_synthetic": real / synthetic,
        }
    return results


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


def main() -> None:
    """Command line: --config, --batch_size, --eval_batch_size, --json, --compare, --pipeline."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    batch_size = flags.DEFINE_integer("batch_size", 128, "Global train batch.")
    eval_batch_size = flags.DEFINE_integer("eval_batch_size", 512, "Global eval batch.")
    output = flags.DEFINE_string("json", None, "Also write the figures here.")
    compare = flags.DEFINE_string("compare", None, "A saved --json result: print ratios to it.")
    input_pipeline = flags.DEFINE_bool(
        "pipeline", False, "Measure the input pipelines (both modes) on the config's data instead."
    )
    input_modes = flags.DEFINE_list(
        "input_modes", ["device", "streaming"], "With --pipeline: the input modes to measure."
    )
    flags.mark_flags_as_required(["config"])

    def run(argv: list[str]) -> None:
        del argv
        host.prepare(config.value, batch_size.value)
        if input_pipeline.value:
            result = pipeline_benchmark(
                config.value, batch_size=batch_size.value, modes=tuple(input_modes.value)
            )
            print(format_pipeline(result))
        else:
            result = benchmark(
                config.value, batch_size=batch_size.value, eval_batch_size=eval_batch_size.value
            )
            baseline = json.loads(Path(compare.value).read_text()) if compare.value else None
            print(format_result(result, baseline))
        if output.value:
            Path(output.value).write_text(json.dumps(result, indent=2) + "\n")

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
