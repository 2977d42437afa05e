"""Tests run on CPU with 8 simulated devices, so the sharded code paths run for real."""

import atexit
import os
import shutil
import tempfile

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
# One persistent compilation cache for the session, its pytest-xdist workers and the runs it
# starts as subprocesses (all inherit this environment): the same LeNet steps are compiled
# by dozens of tests and processes; each is compiled once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnn_lab_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
