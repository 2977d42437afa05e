"""Train on images held in memory (a notebook's NumPy arrays), through the own-data path.

    from cnn_lab.configs import own_data
    from cnn_lab.tools.arrays import train_on_arrays

    results = train_on_arrays(own_data.get_config("resnet20"), "runs/notebook", x, y)
    model, variables, config = cnn_lab.load_run("runs/notebook")

The arrays are saved once as a .npz file named by their content (under ~/.cache/cnn_lab/arrays,
or `cache_dir`), so calling again with the same arrays resumes the run, exactly as a run
from the command line would, and different arrays never reuse another's decoded copy.
"""

import copy
import hashlib
import os
from pathlib import Path

import ml_collections
import numpy as np

from cnn_lab import train


def default_cache_dir() -> Path:
    """~/.cache/cnn_lab/arrays (or under $XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnn_lab" / "arrays"


def save_arrays(arrays: dict[str, np.ndarray], cache_dir: str | Path) -> Path:
    """`arrays` as <cache_dir>/arrays-<hash of their contents>.npz, written once (atomically)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}\0{value.dtype.str}\0{value.shape}\0".encode())
        digest.update(value.tobytes())
    path = Path(cache_dir) / f"arrays-{digest.hexdigest()[:24]}.npz"
    if not path.exists():  # Rewriting would change its time stamp, and so the decoded copy.
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(partial, **arrays)
        partial.replace(path)
    return path


def train_on_arrays(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    class_names: list[str] | None = None,
    cache_dir: str | Path | None = None,
    allow_config_changes: tuple[str, ...] = (),
) -> dict:
    """Train `config` (configs/own_data.py's) on uint8 images (N, H, W[, C]) and labels (N,).

    Validation and test splits not given are carved from the training arrays by the config's
    val_fraction and test_fraction (stratified, seeded). `class_names` (K,) name labels
    0..K-1. Returns `train.train_and_evaluate`'s results (final validation and test metrics).
    """
    given = dict(
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test
    )
    arrays = {k: np.asarray(v) for k, v in given.items() if v is not None}
    if class_names is not None:
        arrays["class_names"] = np.asarray([str(n) for n in class_names])
    config = copy.deepcopy(config)
    config.data.source_dir = str(save_arrays(arrays, cache_dir or default_cache_dir()))
    return train.train_and_evaluate(config, workdir, allow_config_changes=allow_config_changes)
