"""cnn_lab's CPU convolutions over several CPU devices: each device convolves its own shard of
the batch (no all-gather), the kernel and bias gradients are summed over the devices, and the
results equal XLA's; the devices share the cores; several processes train as one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_lab import workdir as workdir_lib
from cnn_lab.kernels import build, devices, selection, stand_ins
from cnn_lab.runtime import sharding

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    build.problem() is not None, reason=f"no CPU kernels here: {build.problem()}"
)

# (input H, W, C; kernel; strides; padding; dilation): strides 1 and 2, "SAME" and explicit
# (uneven) padding, a dilation, few and many channels.
ONEDNN_GEOMETRIES = [
    ((8, 8, 3), (3, 3, 3, 8), (1, 1), "SAME", (1, 1)),
    ((9, 9, 16), (3, 3, 16, 32), (2, 2), ((1, 2), (0, 1)), (1, 1)),
    ((9, 9, 5), (3, 3, 5, 7), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((8, 8, 32), (1, 1, 32, 64), (2, 2), "SAME", (1, 1)),
]
BATCH_MINOR_GEOMETRIES = [
    ((8, 8, 3), (5, 5, 3, 6), (1, 1), "SAME", (1, 1)),
    ((9, 9, 6), (3, 3, 6, 16), (1, 1), ((1, 2), (0, 1)), (1, 1)),
]
# 16 images over the 8 devices for oneDNN; 128 make 16 per device for the batch-minor kernels,
# and 64 make 8, which each device hands to oneDNN. Every gradient (dx dk db) everywhere; the
# kernel gradient alone (a first layer's: its own FFI calls) once per implementation.
ALL, KERNEL_ONLY = (0, 1, 2), (1, 2)
CASES = (
    [("onednn", 16, g, ALL) for g in ONEDNN_GEOMETRIES]
    + [("batch_minor", 128, g, ALL) for g in BATCH_MINOR_GEOMETRIES]
    + [("batch_minor", 64, BATCH_MINOR_GEOMETRIES[0], ALL)]
    + [("onednn", 16, ONEDNN_GEOMETRIES[1], KERNEL_ONLY)]
    + [("batch_minor", 128, BATCH_MINOR_GEOMETRIES[1], KERNEL_ONLY)]
)


def _gradients(convolution, geometry: tuple, argnums: tuple):
    """(output, gradients) of a scalar of `convolution`(x, kernel) + bias, as a function."""
    _, _, strides, padding, dilation = geometry

    def conv(x, kernel, bias):
        y = convolution(
            x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=stand_ins.NHWC
        )
        return y + bias.reshape(1, 1, 1, -1)

    def loss(x, kernel, bias):
        y = conv(x, kernel, bias)
        return jnp.sum(jnp.sin(y)), y

    def both(x, kernel, bias):
        grads, y = jax.grad(loss, argnums, has_aux=True)(x, kernel, bias)
        return y, grads

    return both


def _inputs(batch: int, geometry: tuple) -> tuple[jax.Array, ...]:
    (h, w, c), kernel, *_ = geometry
    rng = np.random.default_rng(0)
    return tuple(
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((batch, h, w, c), kernel, kernel[-1:])
    )


def _sharded(function, mesh):
    """`function` jitted with x split over the batch and kernel and bias on every device, traced
    over `mesh` as cnn_lab's steps are."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        sharding.traced_over(mesh, function),
        in_shardings=(sharding.batch_sharded(mesh), replicated, replicated),
    )


@pytest.mark.parametrize("implementation, batch, geometry, argnums", CASES, ids=str)
def test_sharded_convolution_matches_xla_without_gathering_the_batch(
    implementation, batch, geometry, argnums
):
    assert jax.device_count() == 8  # conftest's forced devices.
    mesh = sharding.make_mesh()
    inputs = _inputs(batch, geometry)
    ours = _sharded(_gradients(selection.convolution(implementation), geometry, argnums), mesh)
    compiled = ours.lower(*inputs).compile().as_text()
    assert "cnn_lab_" in compiled
    assert "all-gather" not in compiled  # Each device convolved its own images.
    # Each device's call sees its own batch shard: batch / 8 images.
    assert f"f32[{batch // 8},{geometry[0][0]},{geometry[0][1]},{geometry[0][2]}]" in compiled
    expected = jax.jit(_gradients(lax.conv_general_dilated, geometry, argnums))(*inputs)
    y, grads = ours(*inputs)
    assert y.sharding.spec[0] == sharding.DATA_AXIS  # The output stays split over the batch.
    names = ["output", *(("input", "kernel", "bias")[i] + " grad" for i in argnums)]
    for got, want, what in zip([y, *grads], [expected[0], *expected[1]], names, strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def test_a_sharded_step_lowers_to_the_same_program_each_time():
    # The persistent compilation cache is keyed by the lowered program: a program that named
    # a per-process callback (as custom partitioning does) would miss it in every new process.
    geometry = ONEDNN_GEOMETRIES[1]
    inputs = _inputs(16, geometry)
    mesh = sharding.make_mesh()
    texts = [
        _sharded(_gradients(stand_ins.onednn_conv_general_dilated, geometry, (0, 1, 2)), mesh)
        .lower(*inputs)
        .as_text()
        for _ in range(2)
    ]
    assert texts[0] == texts[1]
    assert "cnn_lab_onednn_conv_backward" in texts[0]  # Each device's call is in the program.


def test_an_unpartitioned_ffi_call_would_gather_the_batch():
    # The check above can see a gather: the bare FFI call, which XLA cannot split.
    geometry = ONEDNN_GEOMETRIES[0]
    x, kernel, _ = _inputs(16, geometry)
    attributes = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    bare = jax.jit(
        lambda x, k: stand_ins._onednn_forward_call(x, k, attributes),
        in_shardings=(sharding.batch_sharded(sharding.make_mesh()), None),
    )
    assert "all-gather" in bare.lower(x, kernel).compile().as_text()


def test_outside_a_mesh_and_under_vmap_the_calls_run_whole():
    # One device's call in this process of 8: the batch-minor kernels' 16 images, unsplit.
    geometry = BATCH_MINOR_GEOMETRIES[1]
    x, kernel, _ = _inputs(16, geometry)
    _, _, strides, padding, _ = geometry

    def apply(convolution, k):
        return convolution(x, k, strides, padding, dimension_numbers=stand_ins.NHWC)

    kernels = jnp.stack([kernel, 2 * kernel])
    for implementation in ("onednn", "batch_minor"):
        function = selection.convolution(implementation)
        compiled = jax.jit(apply, static_argnums=0).lower(function, kernel).compile()
        assert f"cnn_lab_{implementation}_conv_forward" in compiled.as_text()
        np.testing.assert_allclose(
            compiled(kernel), apply(lax.conv_general_dilated, kernel), rtol=1e-4, atol=1e-4
        )
        np.testing.assert_allclose(
            jax.vmap(lambda k, f=function: apply(f, k))(kernels),
            jax.vmap(lambda k: apply(lax.conv_general_dilated, k))(kernels),
            rtol=1e-4,
            atol=1e-4,
        )


def test_each_call_gets_the_cores_shared_by_the_devices(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert devices.threads_per_device() == max(1, cores // 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "32")
    assert devices.threads_per_device() == 4
    geometry = ONEDNN_GEOMETRIES[0]
    inputs = _inputs(16, geometry)
    function = _gradients(stand_ins.onednn_conv_general_dilated, geometry, (0, 1, 2))
    hlo = _sharded(function, sharding.make_mesh()).lower(*inputs).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="cnn_lab_onednn' in line]
    assert calls and all("threads = 4 : i64" in line for line in calls)
    # One device: OpenMP's default team (every core, or OMP_NUM_THREADS) as before.
    monkeypatch.setattr(jax, "local_devices", lambda backend=None: jax.devices()[:1])
    assert devices.threads_per_device() == 0


RESNET = dict(name="resnet", num_classes=10, depth=8, family="cifar")
LENET = dict(name="lenet5", num_classes=10)


@pytest.mark.parametrize(
    "model, implementation, image_size, size, micro_batches",
    [(RESNET, "onednn", 8, 16, 1), (LENET, "batch_minor", 28, 256, 2)],
    ids=["resnet-onednn", "lenet5-batch_minor-2-micro-batches"],
)
def test_a_train_step_over_eight_devices_matches_xla(
    monkeypatch, tiny_steps, model, implementation, image_size, size, micro_batches
):
    # BatchNorm over the sharded batch, residuals, strided convs, biases, the optimizer, and
    # convolutions inside the micro-batches' scan.
    runs = {}
    for name in ("xla", implementation):
        monkeypatch.setattr(selection, "resolve", lambda *_, i=name: i)
        mesh, state, train_step, eval_step = tiny_steps.setup(
            model, jax.devices(), image_size=image_size, learning_rate=0.1, label_smoothing=0.0,
            micro_batches=micro_batches,
        )  # fmt: skip
        batches = [tiny_steps.batch(image_size, size, seed=i) for i in range(2)]
        step = train_step.lower(state, sharding.to_global(batches[0], mesh)).compile()
        if name != "xla":
            assert f"cnn_lab_{implementation}_conv_forward" in step.as_text()
            assert "all-gather" not in step.as_text()
        for batch in batches:
            state, metrics = step(state, sharding.to_global(batch, mesh))
        batch["mask"] = np.ones(size, bool)
        sums = eval_step(state.variables, sharding.to_global(batch, mesh))
        runs[name] = jax.device_get((state.params, metrics["loss"], sums))
    chex.assert_trees_all_close(runs["xla"], runs[implementation], rtol=2e-4, atol=2e-5)


def _train(workdir: Path, data_dir: Path, launcher: tuple, implementation: str) -> dict:
    """Train LeNet-5 on digits (:smoke, 2 epochs of 4 steps) in 4 CPU devices, as one process
    (no `launcher`) or as `launch.local` starts it; its provenance and last validation."""
    args = [
        "--config=configs/lenet_digits.py:smoke", f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}", "--config.data.input_mode=device",
        f"--config.model.conv_implementation={implementation}",
    ]  # fmt: skip
    entry = ["launch.local", *launcher, "--"] if launcher else ["cnn_lab.train"]
    flags = os.environ["XLA_FLAGS"].replace(
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=4"
    )
    result = subprocess.run(
        [sys.executable, "-m", *entry, *args],
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    provenance = json.loads((workdir / "config.json").read_text())["provenance"]
    records = workdir_lib.read_metrics(workdir)
    return {"provenance": provenance, "val": [r for r in records if r["split"] == "val"][-1]}


@pytest.mark.slow
def test_two_processes_of_two_devices_train_with_onednn_like_xla(tmp_path):
    data_dir = tmp_path / "tfds"
    xla = _train(tmp_path / "xla", data_dir, (), "xla")
    launcher = ("--num_processes=2", "--cpu_devices_per_process=2")
    two = _train(tmp_path / "two", data_dir, launcher, "onednn")
    provenance = two["provenance"]
    assert (provenance["process_count"], provenance["device_count"]) == (2, 4)
    assert provenance["conv_implementation"] == "onednn"
    assert two["val"]["step"] == xla["val"]["step"] == 8
    assert two["val"]["loss"] == pytest.approx(xla["val"]["loss"], rel=1e-3)
