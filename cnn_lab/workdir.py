"""A run's workdir: its lock (one run at a time), its config.json (the resolved config with
provenance, and what may change on resume), the names of what runs write there, and the
reading of their metrics.jsonl."""

import contextlib
import errno
import fcntl
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import ml_collections

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
PREDICTIONS_DIR = "predictions"  # Written by cnn_lab.tools.evaluate.
INSPECT_DIR = "inspect"  # Written by cnn_lab.tools.inspect_run.
PREVIOUS_DIR = "previous"  # Earlier attempts, one dated folder each, moved by a fresh start.
WANDB_DIR = "wandb"  # Weights & Biases' local files (config.logging.wandb_project set).
WANDB_RUN_FILE = "wandb_run_id"  # The W&B run's id: a resumed run continues that W&B run.

# Held (flock) by the process that trains in the workdir; holds its "<PID> <host>" for others.
# The OS releases the lock when that process dies, so the file left behind never blocks.
LOCK_FILE = ".lock"


class WorkdirBusy(ValueError):
    """Another process trains in this workdir (a ValueError: the --workdir value is in use)."""


def _holder_text(lock_path: Path) -> str:
    """The lock's holder as it wrote itself into the lock file: "PID 123 on host gpu7"."""
    pid, _, host = lock_path.read_text().strip().partition(" ")
    return f"PID {pid} on host {host}" if pid and host else "a process that is still starting"


@contextlib.contextmanager
def locked(workdir: str | Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold `workdir`'s exclusive lock (creating the directory), or raise WorkdirBusy at once.

    `enabled=False` (processes other than 0 of a multi-process run) only creates the directory.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not enabled:
        yield
        return
    # "a": opening must not erase the holder's PID before the lock says who holds it.
    with open(workdir / LOCK_FILE, "a") as lock:
        held = True
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(
                f"{workdir} is in use by another training run ({_holder_text(workdir / LOCK_FILE)}"
                "): two runs in one workdir would overwrite each other's checkpoints and "
                "metrics. Wait for that run to end (or stop it), or pass another --workdir. "
                "A run that died has released the lock already: no file needs deleting."
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # Some cluster file systems (Lustre mounted without flock) refuse every lock:
            # training there must still work, as it did before runs took the lock.
            warnings.warn(
                f"{workdir} cannot be locked ({error}): keep to one run in it by hand.",
                stacklevel=3,  # The caller's `with`, past contextlib's __enter__.
            )
            held = False
        if held:
            lock.truncate(0)
            lock.write(f"{os.getpid()} {socket.gethostname()}\n")
            lock.flush()
        try:
            yield
        finally:
            if held:  # Emptied before the lock goes: nobody reads a PID that holds nothing.
                lock.truncate(0)


def holder(workdir: str | Path) -> str | None:
    """Who holds `workdir`'s lock ("PID 123 on host gpu7"), or None when no run holds it.

    A probe that never blocks: it takes a shared lock for an instant, then releases it.
    """
    path = Path(workdir) / LOCK_FILE
    if not path.exists():
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(path)
    return None  # Closing the file released the shared lock.


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
    "logging.wandb_project",
)

# Fields added to the config after runs were written, with the value that reproduces how
# those runs trained: `upgrade` gives a saved config without the field that value.
ADDED_FIELDS = {
    "data.download": False,
    "data.default_image_size": 32,  # Own data's fields, for every config since.
    "data.val_fraction": 0.1,
    "data.test_fraction": 0.1,
    "data.split_seed": 0,
    "data.skip_bad_files": False,
    "data.mapped_max_gb": 0.0,  # Streamed runs decoded each epoch through tf.data.
    "augment.random_erasing": 0.0,
    "augment.random_erasing_area": (0.02, 0.4),  # Unread while random_erasing is 0.
    "augment.random_erasing_aspect": (0.3, 1 / 0.3),
    "model.compute_dtype": "float32",
    "model.conv_implementation": "auto",
    "model.remove": (),
    "train.grad_accumulation_steps": 1,
    "train.cpu_devices": 0,
    "train.keep_freed_memory": True,
    "train.loss_scale_init": 2.0**15,  # Used only by float16, added with it.
    "train.loss_scale_growth_steps": 2000,
}


def write_config(
    workdir: Path, config: ml_collections.ConfigDict, provenance: dict, *, resumed_at: int = 0
) -> None:
    """Write config.json: {"config": the resolved config, "provenance": ...}, atomically.

    A run resumed at step `resumed_at` > 0 keeps what produced its earlier steps: the
    provenance already there moves into provenance["earlier"], oldest first, so a run that
    went on under another commit, machine or library version says so."""
    path = Path(workdir) / CONFIG_FILE
    if resumed_at:
        provenance = {**provenance, "resumed_at": resumed_at}
        before = json.loads(path.read_text()).get("provenance", {}) if path.exists() else {}
        if before:
            provenance["earlier"] = [*before.pop("earlier", []), before]
    record = {"config": config.to_dict(), "provenance": provenance}
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=list) + "\n")
    tmp.replace(path)  # A kill mid-write leaves the old file intact.


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


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train.batch_size": 128, ...}: the leaves of a nested dict under dotted names."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
) -> dict[str, tuple]:
    """{"a.b": (saved value, new value)} for every field that differs between two configs."""
    old = flatten(tuples(json.loads(json.dumps(saved.to_dict(), default=list))))
    cur = flatten(tuples(json.loads(json.dumps(new.to_dict(), default=list))))
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


def tuples(value):
    """`value` read back from JSON, with its lists as tuples (as config files write them)."""
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    return value


def _record(line: str) -> dict | None:
    """The record on one line of metrics.jsonl; None if the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and {"step", "split"} <= record.keys() else None


def read_metrics(workdir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl, in order.

    A last line cut short (a write interrupted by a kill, a full disk or a network file
    system) is dropped with a warning; a resumed run then rewrites the file without it. Any
    other unreadable line raises ValueError naming the file and the line.
    """
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = [_record(line) for _, line in lines]
    if records and records[-1] is None:
        warnings.warn(
            f"The last line of {path} (line {lines[-1][0]}) is cut short: {lines[-1][1][:80]!r}. "
            "Dropping it (a write was interrupted); a resumed run rewrites the file without it.",
            stacklevel=2,
        )
        lines, records = lines[:-1], records[:-1]
    unreadable = [n for (n, _), record in zip(lines, records, strict=True) if record is None]
    if unreadable:
        raise ValueError(
            f"{path} is damaged: line {unreadable[0]} is not a metrics record "
            f"({len(unreadable)} such line(s) before the last). Delete or repair those lines (the "
            "metrics they held are then missing from the record), or use a new --workdir."
        )
    return records
