"""The benchmark's trace says which ops a train step spends its time in."""

import pytest

from cnn_lab.configs import convnet_digits
from cnn_lab.tools.benchmark import benchmark
from cnn_lab.tools.step_trace import format_trace, op_kinds


def test_op_kinds_name_fusions_by_kind_and_custom_calls_by_target():
    hlo = """
  %add_maximum_fusion.14 = f32[8,4]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_computation.1
  %ffi_call.75 = f32[8,4]{1,0} custom-call(%p0), custom_call_target="cnn_lab_onednn_conv_forward"
  ROOT %tuple.3 = (f32[8,4]{1,0}) tuple(%ffi_call.75)
"""
    assert op_kinds(hlo) == {
        "add_maximum_fusion.14": "add_maximum_fusion",
        "ffi_call.75": "cnn_lab_onednn_conv_forward",
        "tuple.3": "tuple",
    }


def test_benchmark_trace_counts_each_convolution_call_of_a_train_step(tmp_path):
    config = convnet_digits.get_config()
    config.model.conv_implementation = "onednn"
    result = benchmark(
        config,
        batch_size=16,
        eval_batch_size=32,
        steps_per_window=2,
        windows=2,
        matmul_size=256,
        trace_dir=str(tmp_path),
    )
    trace = result["train_trace"]
    ops, devices = trace["ops"], result["devices"]
    # The ConvNet's two convolutions on each device's shard: both forward; the second one's
    # input and kernel gradients in one call, the first one's kernel gradient alone (nothing
    # differentiates the images).
    assert ops["cnn_lab_onednn_conv_forward"]["calls"] == pytest.approx(2 * devices)
    assert ops["cnn_lab_onednn_conv_backward"]["calls"] == pytest.approx(devices)
    assert ops["cnn_lab_onednn_conv_kernel_backward"]["calls"] == pytest.approx(devices)
    assert all(figures["ms"] > 0 for figures in ops.values())
    assert list(tmp_path.glob("**/*.trace.json.gz"))
    rows = format_trace(trace, rows=len(ops)).splitlines()[2:-1]
    assert [row.split()[0] for row in rows] == list(ops)
    milliseconds = [float(row.split()[1]) for row in rows]
    assert milliseconds == sorted(milliseconds, reverse=True)  # Costliest first.
