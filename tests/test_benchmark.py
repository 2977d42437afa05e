"""The benchmark measures what it says on a tiny config."""

from cnn_lab.benchmark import benchmark, format_pipeline, format_result, pipeline_benchmark
from configs import mlp_digits


def test_benchmark_reports_rates_compile_time_and_checkpoint_cost():
    config = mlp_digits.get_config()
    result = benchmark(config, batch_size=16, eval_batch_size=32, steps_per_window=2, windows=2)
    assert result["parameters"] == 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    for key in ("train_images_per_second", "eval_images_per_second"):
        rate = result[key]
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
    assert result["compile_seconds"] > 0
    assert 0 < result["checkpoint_blocking_ms"] <= result["checkpoint_total_ms"]
    assert "img/s" in format_result(result)


def test_pipeline_benchmark_measures_both_input_modes(tmp_path):
    config = mlp_digits.get_config("smoke")
    config.data.data_dir = str(tmp_path)
    result = pipeline_benchmark(config, batch_size=64, steps_per_window=3, windows=1)
    for mode in ("device", "streaming"):
        m = result[mode]
        assert m["first_batch_seconds"] > 0 and m["input_examples_per_second"] > 0
        assert m["real_over_synthetic"] == (
            m["train_steps_per_second_real"] / m["train_steps_per_second_synthetic"]
        )
    assert "streaming" in format_pipeline(result)
