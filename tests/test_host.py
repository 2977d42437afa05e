"""The host's set-up: the CPU device count a run asks for, with keep_freed_memory a block
freed and allocated again costs no new page faults, and what a run records of the host."""

import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from cnn_lab.kernels import build, selection
from cnn_lab.runtime import host, provenance, sharding

# Allocates, touches and frees 64 MB twice (as XLA does a step's buffers); prints the page
# faults of the second round.
SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
from cnn_lab.runtime import host
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for round in range(2):  # malloc and free directly: numpy would ask for huge pages itself
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64_000_000)
    ctypes.memset(block, 1, 64_000_000)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(mode: str) -> int:
    command = [sys.executable, "-c", SECOND_ROUND_FAULTS, mode]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def test_freed_memory_is_reused_without_page_faults():
    pages = 64_000_000 // 4096
    assert second_round_faults("default") > pages // 2  # glibc unmapped the block
    assert second_round_faults("keep") < pages // 20


# A train step of a small MLP on a 64 MB batch; prints whether its result was ready when
# the call that dispatched it returned.
STEP_READY = """
from functools import partial
import sys
from cnn_lab.runtime import host
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
import jax, jax.numpy as jnp

@partial(jax.jit, donate_argnums=0)
def step(w):
    x = jnp.ones((8192, 2048))
    def loss(w):
        return (jnp.tanh(jnp.tanh(x @ w[0]) @ w[1]) @ w[2]).sum()
    return jax.tree.map(lambda a, g: a - 1e-9 * g, w, jax.grad(loss)(w))

w = [jnp.full((2048, 512), 0.01), jnp.full((512, 512), 0.01), jnp.full((512, 8), 0.01)]
w = step(jax.block_until_ready(step(w)))  # The second call runs compiled.
print(all(a.is_ready() for a in w))
"""


def step_ready(mode: str) -> bool:
    command = [sys.executable, "-c", STEP_READY, mode]
    found = subprocess.run(command, capture_output=True, text=True, check=True)
    return found.stdout.strip() == "True"


def test_kept_memory_runs_cpu_steps_when_dispatched():
    # Dispatched asynchronously, a step's temporaries were allocated before the step before
    # had freed its own, and a heap that never shrinks kept both: ResNet-20 held 1.4-2 GB
    # instead of 0.7 (cnn_lab.runtime.host).
    assert step_ready("keep")
    assert not step_ready("default")


@pytest.mark.skipif(build.missing() is not None, reason=f"no CPU kernels here: {build.missing()}")
def test_cpu_devices_give_the_kernels_their_device_count_unless_asked_otherwise(monkeypatch):
    def model(name="resnet", **fields):
        return ml_collections.ConfigDict({"name": name, "compute_dtype": "float32", **fields})

    assert host.cpu_devices(0, model(conv_implementation="auto")) == 1
    assert host.cpu_devices(0, model()) == 1  # Runs from before the knob: auto.
    assert host.cpu_devices(0, model(conv_implementation="onednn")) == 1
    assert host.cpu_devices(0, model(conv_implementation="batch_minor")) == 1
    assert host.cpu_devices(0, model(conv_implementation="xla")) == 0
    assert host.cpu_devices(3, model(conv_implementation="onednn")) == 3
    assert host.cpu_devices(0, model("mlp")) == 0  # No convolutions: one device per core.
    assert host.cpu_devices(0, model(compute_dtype="bfloat16")) == 0  # XLA's convolution.
    monkeypatch.setattr(selection, "KERNEL_CPU_DEVICES", 2)  # The one rule for the count.
    assert host.cpu_devices(0, model(conv_implementation="onednn")) == 2
    assert host.cpu_devices(0, model(conv_implementation="auto")) == 2


@pytest.mark.parametrize(
    ("devices", "extra"), [("/dev/nvidia0", "'.[cuda12]'"), ("/dev/accel0", "'.[tpu]'")]
)
def test_an_accelerator_left_idle_is_one_warning_naming_the_extra(monkeypatch, devices, extra):
    monkeypatch.setattr(
        host.glob, "glob", lambda pattern: [devices] if pattern[:8] == devices[:8] else []
    )
    (warning,) = host.accelerator_warnings("float32")
    assert devices in warning and extra in warning and "CPU build" in warning


def test_accelerator_precision_on_the_cpu_is_a_warning(monkeypatch):
    monkeypatch.setattr(host.glob, "glob", lambda pattern: [])
    assert host.accelerator_warnings("float32") == []
    (warning,) = host.accelerator_warnings("bfloat16")
    assert "compute_dtype='bfloat16'" in warning and "slower than float32" in warning


def test_provenance_names_the_cpu_and_xla_flags_a_run_computed_with(monkeypatch):
    # The same code and versions round differently on other vector extensions, so a run that
    # does not reproduce must show which CPU and flags it ran under.
    cpuinfo = {"model name": "Test Xeon", "cpu family": "6", "model": "143", "cache size": "1 KB"}
    cpuinfo["flags"] = "fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_tile ht"
    monkeypatch.setattr(build, "_cpu_fields", lambda: cpuinfo)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    record = provenance.collect(sharding.make_mesh(jax.devices()[:1]), "xla")
    assert record["cpu"] == {
        "model": "Test Xeon",
        "family_model": "6-143",
        "cores": os.cpu_count(),
        "cache": "1 KB",
        "extensions": ["amx_tile", "avx", "avx2", "avx512_bf16", "avx512f", "fma", "sse4_2"],
    }
    assert record["xla_flags"] == "--xla_cpu_max_isa=AVX2"
    assert build.wide_vectors()  # The kernels' choice reads the same flags.
