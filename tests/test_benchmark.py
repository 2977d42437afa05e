"""The benchmark measures what it says on a tiny config."""

import json

import pytest

from cnn_lab.configs import mlp_digits
from cnn_lab.tools.benchmark import benchmark, pipeline_benchmark
from cnn_lab.tools.benchmark_format import format_pipeline, format_result


@pytest.fixture(scope="module")
def result():
    config = mlp_digits.get_config()
    return benchmark(
        config, batch_size=16, eval_batch_size=32, steps_per_window=2, windows=2, matmul_size=256
    )


def test_benchmark_reports_rates_compile_time_and_checkpoint_cost(result):
    assert result["parameters"] == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    for key in ("train_images_per_second", "eval_images_per_second"):
        rate = result[key]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
    assert result["compile_seconds"] > 0
    assert 0 < result["checkpoint_blocking_ms"] <= result["checkpoint_total_ms"]
    assert result["peak_host_memory_mb"] > 0
    peak = result["matmul_peak_gflops"]["median"]
    for step in ("train", "eval"):
        images_per_second = result[f"{step}_images_per_second"]["median"]
        gflops = result[f"{step}_flops_per_image"] * images_per_second / 1e9
        assert result[step]["gflops"] == pytest.approx(gflops)
        assert result[step]["percent_of_peak"] == pytest.approx(100 * gflops / peak)
    # The MLP's forward pass is one multiply-add per weight; training costs more than that.
    weights = 64 * 256 + 256 * 128 + 128 * 10
    assert result["eval_flops_per_image"] >= 2 * weights
    assert result["train_flops_per_image"] > 2 * result["eval_flops_per_image"]
    assert "train % of peak" in format_result(result)
    halved = json.loads(json.dumps(result))
    halved["train_images_per_second"]["median"] /= 2
    row = next(line for line in format_result(result, halved).splitlines() if "train img/s" in line)
    assert row.split()[-1] == "2.00"


def test_benchmark_breaks_host_memory_down_by_phase(result):
    breakdown = result["host_memory"]
    phases = breakdown["phases"]
    assert tuple(phases) == (
        "imports", "matmul peak", "state", "compile", "training", "eval", "checkpoint",
        "cost analysis",
    )  # fmt: skip
    for name, phase in phases.items():
        assert 0 < phase["resident_mb"] <= phase["peak_mb"], name
        assert phase["page_faults"] >= 0, name
        assert phase["allocator_free_mb"] is None or phase["allocator_free_mb"] >= 0, name
    assert result["peak_host_memory_mb"] == breakdown["peak_mb"]
    assert breakdown["peak_mb"] == max(phase["peak_mb"] for phase in phases.values())
    # jax alone is more. (Later phases may hold less: this process ran other tests before,
    # and the benchmark gives freed memory back after compiling.)
    assert phases["imports"]["resident_mb"] > 50
    assert breakdown["keep_freed_memory"] is True  # the config's
    assert set(breakdown["heavy_modules"]) <= {"tensorflow", "tensorflow_datasets", "torch"}
    table = format_result(result)
    assert "host memory MB" in table
    assert next(line for line in table.splitlines() if line.split()[0] == "training")


def test_compare_reads_results_saved_before_the_memory_breakdown(result):
    older = json.loads(json.dumps(result))
    del older["host_memory"]
    rows = format_result(result, older).splitlines()
    assert next(row for row in rows if "peak host memory MB" in row).split()[-1] == "1.00"
    assert len(next(row for row in rows if "training peak MB" in row).split()) == 4  # no ratio
    assert "training peak MB" not in format_result(older)


def test_pipeline_benchmark_measures_both_input_modes(tmp_path):
    config = mlp_digits.get_config("smoke")
    config.data.data_dir = str(tmp_path)
    result = pipeline_benchmark(config, batch_size=64, window_seconds=0.1, windows=1)
    for mode in ("device", "streaming"):
        m = result[mode]
        assert m["first_batch_seconds"] > 0 and m["input_examples_per_second"] > 0
        assert m["real_over_synthetic"] == (
            m["train_steps_per_second_real"] / m["train_steps_per_second_synthetic"]
        )
    assert "streaming" in format_pipeline(result)
