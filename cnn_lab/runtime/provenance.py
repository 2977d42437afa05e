"""What produced a run: code version, library versions, devices and the host's CPU and XLA
flags, stored in config.json. Same versions and flags on CPUs with other vector extensions may
round differently, so a run reproduces bit for bit only where all of these match."""

import importlib.metadata
import os
import subprocess
from pathlib import Path

import jax
from jax.sharding import Mesh

from cnn_lab.kernels import build

_PACKAGES = (
    "jax",
    "jaxlib",
    "numpy",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "tensorflow-cpu",
    "tensorflow",
    "diffrax",
    "equinox",
    "ml-collections",
    "onednn-cpu-gomp",
)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(mesh: Mesh, conv_implementation: str) -> dict:
    """Git commit (and whether the tree had changes), package versions, devices of `mesh`, the
    convolution implementation ("xla", "onednn" or "batch_minor") the run's model computes
    with, the host's CPU (build.cpu()) and the XLA_FLAGS it ran under."""
    status = _git("status", "--porcelain")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "versions": {p: _version(p) for p in _PACKAGES},
        "device_kind": mesh.devices.flat[0].device_kind,
        "device_count": int(mesh.size),
        "process_count": jax.process_count(),
        "conv_implementation": conv_implementation,
        "cpu": build.cpu(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
