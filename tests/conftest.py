"""Tests run on CPU with 8 simulated devices, so the sharded code paths run for real."""

import os

# Must precede the first jax import anywhere in the test session.
# 8 simulated devices share 2 cores: a loaded machine can hold one device's thread back
# for longer than XLA's default collective timeout (about 40 s), which aborts the process.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_collective_call_terminate_timeout_seconds=900",
        "--xla_cpu_collective_timeout_seconds=900",
        "--xla_cpu_multi_thread_eigen=false",
    ]
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
