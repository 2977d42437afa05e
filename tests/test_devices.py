"""The CPU backend is split into one device per core unless a count is configured or forced."""

import os
import subprocess
import sys

import pytest

SHOW_DEVICES = (
    "import sys; from cnn_lab.runtime import sharding; "
    "sharding.use_cpu_devices(int(sys.argv[1]), int(sys.argv[2])); "
    "import jax; print(jax.device_count())"
)
CORES = len(os.sched_getaffinity(0))


def device_count(requested: int, xla_flags: str, batch_size: int = 0) -> int:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SHOW_DEVICES, str(requested), str(batch_size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize(
    ("requested", "xla_flags", "expected"),
    [
        (0, "", CORES),
        (3, "", 3),
        (3, "--xla_force_host_platform_device_count=5", 5),
    ],
)
def test_cpu_devices_default_to_one_per_core_and_yield_to_xla_flags(requested, xla_flags, expected):
    assert device_count(requested, xla_flags) == expected


def test_one_device_per_core_unless_the_batch_does_not_split():
    # A prime batch larger than the core count splits over one device only.
    assert device_count(0, "", batch_size=CORES * 2) == CORES
    assert device_count(0, "", batch_size=10007) == 1
