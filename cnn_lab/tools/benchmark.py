"""Measure a config's speed against the machine: `python -m cnn_lab.benchmark --config=...`.

One run measures the machine's float32 matmul throughput (the reference peak), the train and
eval steps on synthetic batches already on the devices (images/s, compile time, GFLOP/s from
XLA's cost analysis and as a share of the peak), host memory per phase (`runtime.memory`) and
the cost of a checkpoint save. `--pipeline` measures the input pipelines instead, on the
config's real data; `--compare=<saved.json>` prints the ratio of each figure to an earlier run;
`--trace=DIR` also writes a profiler trace of train steps and prints their time per kind of op.
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
from cnn_lab.tools import step_trace
from cnn_lab.tools.benchmark_format import format_pipeline, format_result


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
    return _rate(_timed_calls(lambda: product(a), repeats, windows), 2 * size**3 * repeats / 1e9)


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


def _synthetic_batch(rng, shape, num_classes, mesh, size: int, with_mask: bool = False) -> dict:
    """Random images and labels of `size` examples, already split over the mesh."""
    batch = {
        "image": rng.normal(size=(size, *shape)).astype(np.float32),
        "label": rng.integers(0, num_classes, size).astype(np.int32),
    }
    if with_mask:
        batch["mask"] = np.ones(size, bool)
    return jax.device_put(batch, sharding.batch_sharded(mesh))


def _timed_calls(call, steps_per_window: int, windows: int) -> list[float]:
    """Seconds of each window of `steps_per_window` calls, after one window of warm-up."""

    def window():
        for _ in range(steps_per_window):
            out = call()
        jax.block_until_ready(out)

    window()
    return _timed_windows(window, windows)


def _flops_per_image(config, model, tx, schedule, mesh, state, batches, compiled) -> list[float]:
    """FLOPs per image of the compiled (train, eval) steps on their (train, eval) batches.

    XLA's cost analysis cannot see into the CPU kernels' calls: with them, the same steps
    with XLA's convolution are compiled and counted instead.
    """
    if conv_implementation(model) != "xla":
        xla_model = model.clone(convolution=lax.conv_general_dilated)
        train_step = _jit_train_step(config, xla_model, tx, schedule, mesh)
        eval_step = steps.make_eval_fn(xla_model, mesh)
        compiled = (
            train_step.lower(state, batches[0]).compile(),
            eval_step.lower(state.variables, batches[1]).compile(),
        )
    return [_flops(c, mesh.size) / len(b["label"]) for c, b in zip(compiled, batches, strict=True)]


def benchmark(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    eval_batch_size: int,
    steps_per_window: int = 10,
    windows: int = 5,
    matmul_size: int = 2048,
    trace_dir: str | None = None,
) -> dict:
    """Train/eval images/s, GFLOP/s and share of the matmul peak, compile s, memory, checkpoint ms;
    with `trace_dir`, also a profiler trace of train steps there and its time per kind of op."""
    phases = memory.Phases()
    phases.end("imports")
    peak = matmul_peak_gflops(matmul_size)
    phases.end("matmul peak")
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh, "--batch_size")
    sharding.check_batch_size(eval_batch_size, mesh, "--eval_batch_size")
    model = get_model(config.model)
    # The schedule's length does not change the step's cost; any fixed one will do.
    schedule, tx, plateau = optim.from_config(config, steps_per_epoch=100, total_steps=10_000)
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    state = _fresh_state(config, model, tx, plateau, shape, mesh)
    rng = np.random.default_rng(0)
    train_batch = _synthetic_batch(rng, shape, config.model.num_classes, mesh, batch_size)
    phases.end("state")

    train_step = _jit_train_step(config, model, tx, schedule, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, train_batch).compile()
    compile_seconds = time.perf_counter() - start
    host.release_freed_memory()  # As training does after its first step.
    phases.end("compile")
    holder = {"state": state}

    def train_call():
        holder["state"], metrics = compiled(holder["state"], train_batch)
        return metrics

    train_times = _timed_calls(train_call, steps_per_window, windows)
    phases.end("training")
    eval_batch = _synthetic_batch(rng, shape, config.model.num_classes, mesh, eval_batch_size, True)
    variables = holder["state"].variables
    eval_fn = steps.make_eval_fn(model, mesh).lower(variables, eval_batch).compile()
    eval_times = _timed_calls(lambda: eval_fn(variables, eval_batch), steps_per_window, windows)
    phases.end("eval")
    checkpoint_ms = _checkpoint_costs(holder["state"], windows)
    phases.end("checkpoint")
    batches = (train_batch, eval_batch)
    flops = _flops_per_image(config, model, tx, schedule, mesh, state, batches, (compiled, eval_fn))
    phases.end("cost analysis")
    # Last, so that the profiler's memory stays out of the phases above.
    trace = None
    if trace_dir:
        trace = step_trace.trace_step(train_call, 5, trace_dir, compiled.as_text())
    rates = [
        _rate(times, size * steps_per_window)
        for times, size in ((train_times, batch_size), (eval_times, eval_batch_size))
    ]
    host_memory = phases.breakdown(config.train.keep_freed_memory)
    return {
        "model": config.model.name,
        "image_shape": list(shape),
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "devices": mesh.size,
        "device_kind": mesh.devices.flat[0].device_kind,
        "conv_implementation": conv_implementation(model),
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "compile_seconds": compile_seconds,
        "matmul_peak_gflops": peak,
        **{
            key: value
            for split, per_image, rate in zip(("train", "eval"), flops, rates, strict=True)
            for key, value in _step_figures(split, per_image, rate, peak["median"]).items()
        },
        "peak_host_memory_mb": host_memory["peak_mb"],
        "host_memory": host_memory,
        **checkpoint_ms,
        **({"train_trace": trace} if trace else {}),
    }


def _step_figures(split: str, flops_per_image: float, rate: dict, peak_gflops: float) -> dict:
    """A step's images/s, FLOPs per image, and GFLOP/s achieved, also as a share of the peak."""
    achieved = flops_per_image * rate["median"] / 1e9
    return {
        f"{split}_images_per_second": rate,
        f"{split}_flops_per_image": flops_per_image,
        split: {"gflops": achieved, "percent_of_peak": 100 * achieved / peak_gflops},
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


def main() -> None:
    """Command line: --config, --batch_size, --eval_batch_size, --json, --compare, --trace,
    --pipeline."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    batch_size = flags.DEFINE_integer("batch_size", 128, "Global train batch.")
    eval_batch_size = flags.DEFINE_integer("eval_batch_size", 512, "Global eval batch.")
    output = flags.DEFINE_string("json", None, "Also write the figures here.")
    compare = flags.DEFINE_string("compare", None, "A saved --json result: print ratios to it.")
    trace_dir = flags.DEFINE_string(
        "trace",
        None,
        "Also write a profiler trace of train steps here and print where they spend time.",
    )
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
                config.value,
                batch_size=batch_size.value,
                eval_batch_size=eval_batch_size.value,
                trace_dir=trace_dir.value,
            )
            baseline = json.loads(Path(compare.value).read_text()) if compare.value else None
            print(format_result(result, baseline))
            if trace_dir.value:
                print(step_trace.format_trace(result["train_trace"]))
        if output.value:
            Path(output.value).write_text(json.dumps(result, indent=2) + "\n")

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
