"""Tests run on CPU with 8 simulated devices, so the sharded code paths run for real."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
