"""Tests run on CPU with 8 simulated devices, so the sharded code paths run for real.

Shared fixtures: `launch` and its `launch_env`, `repo_root`, `tiny_run`, `prepare_digits` and
`slurm_cluster` for the tests that start processes; `tiny_steps` for the step tests.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import ml_collections
import numpy as np
import pytest

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
        # Tests compile far more than they compute: LLVM without optimisation takes a sixth off
        # the suite's time. Convolutions and large matrix products call libraries either way.
        "--xla_backend_optimization_level=0",
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
# Strict dtype promotion (below) in the runs tests start as subprocesses too.
os.environ["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
# Strict dtype promotion: an implicit float64/int upcast or a weak-type mix-up is an error.
jax.config.update("jax_numpy_dtype_promotion", "strict")

ROOT = Path(__file__).resolve().parents[1]

# A few steps of the MLP on slices of digits: each run takes a few seconds.
TINY_RUN = {
    "train.num_epochs": 1,
    "model.hidden_sizes": (32,),
    "data.train_split": "train[:256]",
    "data.validation_split": "train[-128:]",
    "data.test_split": "test[:128]",
    "eval.batch_size": 128,
}


# --- Launched processes: `python -m <module>` from the repository root, as users run them. ---


def _launch_env() -> dict[str, str]:
    """The test environment for launched processes (and SLURM jobs, which inherit it).

    The code under test comes first on PYTHONPATH; the runs use one CPU device, not the
    eight the in-process tests simulate: they are single-process runs and start faster.
    """
    variables = dict(os.environ)
    variables["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    variables["XLA_FLAGS"] = variables.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"
    )
    return variables


def _launch(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=_launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _prepare_digits(data_dir: Path) -> None:
    """Prepare digits in `data_dir` and decode TINY_RUN's splits once, not in every run."""
    from cnn_lab.configs import mlp_digits
    from cnn_lab.data import pipeline

    data = mlp_digits.get_config("smoke").data
    data.update({k.removeprefix("data."): v for k, v in TINY_RUN.items() if k.startswith("data.")})
    data.data_dir = str(data_dir)
    for split in (data.train_split, data.validation_split, data.test_split):
        pipeline.load(data, split)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root, where launched processes run."""
    return ROOT


@pytest.fixture(scope="session")
def launch_env() -> dict[str, str]:
    """The environment of launched processes: this checkout first, one CPU device."""
    return _launch_env()


@pytest.fixture(scope="session")
def launch():
    """launch(module, *args, timeout=300): `python -m <module> <args>`, output captured."""
    return _launch


@pytest.fixture(scope="session")
def tiny_run() -> dict:
    """Config overrides for a run of a few seconds: the MLP on slices of digits."""
    return dict(TINY_RUN)


@pytest.fixture(scope="session")
def prepare_digits():
    """prepare_digits(data_dir): digits prepared there, with the tiny run's splits decoded."""
    return _prepare_digits


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skips, saying why, unless a SLURM cluster started by .ci/slurm_cluster.sh is up."""
    if not os.environ.get("SLURM_CONF"):
        pytest.skip(
            "no test SLURM cluster: SLURM_CONF is unset (.ci/run starts one with "
            ".ci/slurm_cluster.sh when slurmctld, slurmd and munge are installed)"
        )
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM_CONF is set but sbatch is not installed")
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if "idle" not in state.stdout and "mix" not in state.stdout:
        pytest.skip(f"the SLURM cluster of {os.environ['SLURM_CONF']} has no usable node: {state}")


# --- Jitted train and eval steps of a tiny model over some devices, for the step tests. ---


def _tiny_setup(
    model_config: dict,
    devices,
    *,
    image_size: int,
    learning_rate: float,
    label_smoothing: float,
    averaging=None,
    micro_batches: int = 1,
    loss_scale=None,
):
    """(mesh, state, train_step, eval_step): SGD with Nesterov momentum, constant rate;
    `loss_scale` (loss_scaling.from_config) for float16."""
    # Imported here, not above: a test session that never builds steps (or that checks what
    # importing cnn_lab loads) does not get the models and optimizer imported behind its back.
    from cnn_lab import optim, steps
    from cnn_lab.averaging import NO_AVERAGES
    from cnn_lab.models import get_model
    from cnn_lab.runtime import sharding
    from cnn_lab.state import init_state

    averaging = NO_AVERAGES if averaging is None else averaging
    mesh = sharding.make_mesh(devices)
    model = get_model(ml_collections.ConfigDict(model_config))
    config = ml_collections.ConfigDict(
        dict(
            optimizer=dict(
                name="sgd",
                learning_rate=learning_rate,
                momentum=0.9,
                nesterov=True,
                weight_decay=5e-4,
                grad_clip_norm=None,
                param_groups=(),
            ),
            schedule=dict(
                name="constant",
                warmup_epochs=0.0,
                decay_factor=0.1,
                plateau_patience=2,
                plateau_min_delta=1e-3,
            ),
            train=dict(num_epochs=1),
            phases=(),
        )
    )
    schedule, tx, plateau = optim.from_config(config, steps_per_epoch=10, total_steps=10)
    state = init_state(
        model,
        tx,
        plateau,
        jax.random.PRNGKey(0),
        (image_size, image_size, 1),
        mesh,
        averaging=averaging,
        loss_scale=loss_scale,
    )
    train_step = steps.jit_train_step(
        model,
        tx,
        schedule,
        mesh,
        label_smoothing=label_smoothing,
        averaging=averaging,
        micro_batches=micro_batches,
    )
    return mesh, state, train_step, steps.make_eval_fn(model, mesh)


def _tiny_batch(image_size: int, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images (n, image_size, image_size, 1) and labels (n,) of 10 classes."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, image_size, image_size, 1)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }


@pytest.fixture(scope="session")
def tiny_steps() -> types.SimpleNamespace:
    """tiny_steps.setup(model_config, devices, *, image_size, learning_rate, label_smoothing,
    averaging=None, micro_batches=1, loss_scale=None) -> (mesh, state, train_step, eval_step), and
    tiny_steps.batch(image_size, n=16, seed=0) -> random images and labels."""
    return types.SimpleNamespace(setup=_tiny_setup, batch=_tiny_batch)


# Files whose tests take minutes start first (pytest-xdist hands out whole files in collection
# order), so the suite does not end with one worker running one of them alone.
LONG_FILES = (
    "test_readme.py",
    "test_fashion_mnist.py",
    "test_workdir_integrity.py",
    "test_multidevice_kernels.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONG_FILES)  # Stable: order kept within.
