"""A run's workdir: its config.json (the resolved config with provenance, and what may change
on resume), and the outputs a fresh start moves aside."""

import datetime
import json
import shutil
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cnn_lab import checkpoint
from cnn_lab.sweep import tuples  # JSON lists back to tuples, as config files write them.

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
PREDICTIONS_DIR = "predictions"  # Written by cnn_lab.tools.evaluate.
INSPECT_DIR = "inspect"  # Written by cnn_lab.tools.inspect_run.
PREVIOUS_DIR = "previous"  # Earlier attempts, one dated folder each, moved by a fresh start.

# What a training attempt, and the tools run on it, write into the workdir (glob patterns).
# A run starting from scratch moves these aside. Left in place: previous/, broken_checkpoints/
# (quarantined steps, each named by step and time, read by nothing and named in the error that
# preceded the fresh start) and files other programs keep there (launcher logs, the lock).
RUN_OUTPUTS = (
    checkpoint.LATEST_DIR,
    checkpoint.BEST_DIR,
    checkpoint.SNAPSHOT_DIR,
    CONFIG_FILE,
    CONFIG_FILE + ".tmp",
    METRICS_FILE,
    METRICS_FILE + ".tmp",
    TENSORBOARD_DIR,
    CURVES_FILE,
    "eval_*.json",
    "ensemble_*.json",
    PREDICTIONS_DIR,
    INSPECT_DIR,
)

# Changing these never changes what is trained, so a resumed run may always change them.
ALWAYS_CHANGEABLE = (
    "train.log_every_steps",
    "train.progress_bar",
    "train.cpu_devices",  # Changes only the order of floating-point reductions.
    "model.conv_implementation",  # Likewise: XLA's and oneDNN's convolutions agree to rounding.
    "eval.batch_size",
    "eval.snapshots",
    "eval.crop_fraction",
    "eval.scales",
    "eval.mc_dropout_samples",
    "checkpoint.keep",
    "checkpoint.every_steps",
    "data.data_dir",
    "data.source_dir",
    "data.keep_decoded",
)

# Fields added to the config after runs were written, with the value that reproduces how
# those runs trained: `upgrade` gives a saved config without the field that value.
ADDED_FIELDS = {
    "model.compute_dtype": "float32",
    "model.conv_implementation": "auto",
    "train.grad_accumulation_steps": 1,
    "train.cpu_devices": 0,
    "train.keep_freed_memory": True,
}


def write_config(workdir: Path, config: ml_collections.ConfigDict, provenance: dict) -> None:
    """Write config.json: {"config": the resolved config, "provenance": ...}, atomically."""
    record = {"config": config.to_dict(), "provenance": provenance}
    tmp = Path(workdir) / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=list) + "\n")
    tmp.replace(Path(workdir) / CONFIG_FILE)  # A kill mid-write leaves the old file intact.


def read_config(workdir: Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (lists as tuples, as config files write them)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{workdir} holds no cnn_lab run ({CONFIG_FILE} not found). Pass the --workdir "
            "of a run started with `python -m cnn_lab.train`."
        )
    try:
        saved = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as error:  # Not JSON, or not a config record.
        raise ValueError(
            f"{path} is damaged and cannot be read ({type(error).__name__}: {error}), e.g. by a "
            "full disk or a copy cut short. Restore it from a backup or copy of the run, or use "
            "a new --workdir."
        ) from None
    return upgrade(ml_collections.ConfigDict(tuples(saved)))


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` as saved by an older cnn_lab, with each field added since (ADDED_FIELDS).

    The one place older workdirs are brought up to date: code downstream reads every field.
    """
    for field, value in ADDED_FIELDS.items():
        section, name = field.split(".")
        if name not in config[section]:
            config[section][name] = value
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> dict[str, tuple]:
    """{"a.b": (saved value, new value)} for every field that differs between two configs."""
    old = _flatten(tuples(json.loads(json.dumps(saved.to_dict(), default=list))))
    cur = _flatten(tuples(json.loads(json.dumps(new.to_dict(), default=list))))
    return {
        k: (old.get(k), cur.get(k))
        for k in sorted(old.keys() | cur.keys())
        if old.get(k) != cur.get(k)
    }


def check_resumable(
    workdir: Path, config: ml_collections.ConfigDict, allowed: tuple[str, ...] = ()
) -> None:
    """Raise ValueError naming each field that differs from the run in `workdir`, unless allowed."""
    changes = config_changes(read_config(workdir), config)
    refused = {
        k: (old, new)
        for k, (old, new) in changes.items()
        if k not in (*ALWAYS_CHANGEABLE, *allowed)
    }
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"{workdir} holds a run trained with a different config ({listed}). Resuming would "
            "mix two experiments. Use a new --workdir for the new config, or, if the change is "
            f"intended (e.g. more epochs), pass --allow_config_changes={','.join(refused)}."
        )


def check_config_present(workdir: Path, steps: list[int]) -> None:
    """Raise FileNotFoundError if a workdir with checkpoint `steps` to resume lacks config.json."""
    if not (Path(workdir) / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"{Path(workdir) / CONFIG_FILE} is missing, but {workdir} holds checkpoints to resume "
            f"(steps {sorted(steps)}): without it this run cannot check that it resumes with the "
            "config they were trained with. Restore config.json from a backup or copy of the run, "
            "or use a new --workdir for this config."
        )


def _dated_folder(parent: Path) -> Path:
    """A new folder in `parent` named by the UTC time (with a suffix if that name is taken)."""
    name = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    folder, n = parent / name, 1
    while folder.exists():
        folder, n = parent / f"{name}-{n}", n + 1
    folder.mkdir(parents=True)
    return folder


def _earlier_outputs(workdir: Path) -> list[Path]:
    """The RUN_OUTPUTS present in `workdir`; checkpoints/ counts only when it holds anything."""
    found = sorted({p for pattern in RUN_OUTPUTS for p in workdir.glob(pattern)})
    latest = workdir / checkpoint.LATEST_DIR
    return [p for p in found if p != latest or any(latest.iterdir())]


def move_previous_attempt(workdir: Path, latest: ocp.CheckpointManager) -> Path | None:
    """For a run starting from scratch: move every earlier output in `workdir` into one new
    folder previous/<UTC time>/, so that nothing this run did not write can pass for its own.

    Returns that folder (None if there was nothing to move). `latest`, the run's manager open
    on checkpoints/ (which holds no step at a fresh start), keeps its directory: only its
    contents move, then it reloads. Process 0 moves the files; every process must call this.
    """
    workdir = Path(workdir)
    moved_to = None
    if jax.process_index() == 0:
        earlier = _earlier_outputs(workdir)
        if earlier:
            moved_to = _dated_folder(workdir / PREVIOUS_DIR)
            for path in earlier:
                if path.name == checkpoint.LATEST_DIR:
                    (moved_to / path.name).mkdir()
                    for entry in path.iterdir():
                        shutil.move(str(entry), str(moved_to / path.name / entry.name))
                else:
                    shutil.move(str(path), str(moved_to / path.name))
            print(
                f"Starting from scratch: moved the earlier outputs in {workdir} "
                f"({', '.join(p.name for p in earlier)}) to {moved_to}."
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cnn_lab_move_previous_attempt")
    latest.reload()
    return moved_to
