"""The CPU kernels sit behind one seam: off CPU nothing of `cnn_lab.kernels` loads, and on a
CPU host the selection and the build run once per process however many models are built."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_lab.kernels import build

ROOT = Path(__file__).resolve().parent.parent

# Builds every model of the zoo (each config's at its image size, and each registered class
# with its defaults) and prints the implementations and the kernel modules that were loaded.
BUILD_THE_ZOO = """
import importlib, json, sys
from pathlib import Path
import jax, jax.numpy as jnp, ml_collections
from cnn_lab import models
from cnn_lab.runtime import host

def build_the_zoo():
    implementations = {}
    for path in sorted(Path("configs").glob("*.py")):
        if path.stem in ("__init__", "common", "own_data"):  # own_data: shapes from the data.
            continue
        config = importlib.import_module(f"configs.{path.stem}").get_config()
        model = models.get_model(config.model)
        shape = (2, config.data.image_size, config.data.image_size, config.data.channels)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        jax.eval_shape(lambda x, m=model: m.init(jax.random.PRNGKey(0), x, train=False), x)
        implementations[path.stem] = models.conv_implementation(model)
    for name in models.MODELS:
        model = models.get_model(ml_collections.ConfigDict(dict(name=name, num_classes=3)))
        implementations[name] = models.conv_implementation(model)
    return implementations
"""
OFF_CPU = (
    BUILD_THE_ZOO
    + """
# As on a host whose backend is named other than CPU: the device count is decided without
# the kernels, and then models are built for a GPU backend.
jax.config.update("jax_platforms", "cuda")
resnet = ml_collections.ConfigDict(dict(name="resnet", num_classes=10))
assert host.cpu_devices(0, resnet) == 0
jax.config.update("jax_platforms", "cpu")  # No backend has started: the zoo traces on CPU.
jax.default_backend = lambda: "gpu"
implementations = build_the_zoo()
loaded = sorted(m for m in sys.modules if m.startswith("cnn_lab.kernels"))
print(json.dumps({"implementations": implementations, "loaded": loaded}))
"""
)
ON_CPU = (
    BUILD_THE_ZOO
    + """
jax.config.update("jax_num_cpu_devices", 1)  # A user's default run: one device, the kernels.
from cnn_lab.kernels import build, selection
builds = []
build_library = build._build
build._build = lambda *args, **kwargs: builds.append(1) or build_library(*args, **kwargs)
implementations = build_the_zoo()
implementations.update(build_the_zoo())
loaded = sorted(m for m in sys.modules if m.startswith("cnn_lab.kernels"))
print(json.dumps({
    "implementations": implementations,
    "loaded": loaded,
    "builds": len(builds),
    "looks": selection._process_obstacles.cache_info().misses,
    "loads": build.problem.cache_info().misses,
}))
"""
)


def run(script: str) -> dict:
    """What `script` prints, run in a fresh process with one CPU device, from the repo root."""
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_off_cpu_the_zoo_never_imports_the_kernels():
    found = run(OFF_CPU)
    assert found["loaded"] == []
    assert set(found["implementations"].values()) == {"xla"}
    assert {"lenet5", "resnet", "odenet", "ode_resnet", "resnet50_imagenet"} <= set(
        found["implementations"]
    )


@pytest.mark.skipif(build.problem() is not None, reason=f"no CPU kernels here: {build.problem()}")
def test_on_cpu_the_kernels_are_selected_and_built_once_per_process():
    found = run(ON_CPU)
    # Every conv model of the zoo, built twice, got the kernels from one look and one build.
    assert (found["looks"], found["builds"], found["loads"]) == (1, 1, 1)
    assert "cnn_lab.kernels.selection" in found["loaded"]  # The check above can see imports.
    implementations = found["implementations"]
    assert implementations["resnet"] == "onednn" and implementations["mlp"] == "xla"
    expected = "batch_minor" if build.wide_vectors() else "onednn"
    assert implementations["lenet5"] == implementations["lenet_cifar10"] == expected
