"""The CPU backend is split into one device per core unless a count is configured or forced."""

import os
import subprocess
import sys

import pytest

SHOW_DEVICES = (
    "import sys; from cnn_lab import sharding; sharding.use_cpu_devices(int(sys.argv[1])); "
    "import jax; print(jax.device_count())"
)


def device_count(requested: int, xla_flags: str) -> int:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SHOW_DEVICES, str(requested)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize(
    ("requested", "xla_flags", "expected"),
    [
        (0, "", len(os.sched_getaffinity(0))),
        (3, "", 3),
        (3, "--xla_force_host_platform_device_count=5", 5),
    ],
)
def test_cpu_devices_default_to_one_per_core_and_yield_to_xla_flags(requested, xla_flags, expected):
    assert device_count(requested, xla_flags) == expected
