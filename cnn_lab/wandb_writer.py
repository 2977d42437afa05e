"""Weights & Biases mirror of a run (optional, `pip install 'cnn_lab[wandb]'`): its config,
metrics and learning curves, in one W&B run that a resumed training continues."""

import importlib.util
from pathlib import Path

import ml_collections

from cnn_lab.workdir import WANDB_RUN_FILE


def project(config: ml_collections.ConfigDict) -> str:
    """config.logging.wandb_project: the W&B project to log to; "" (or absent): no W&B."""
    return config.get("logging", {}).get("wandb_project", "")


def check_installed(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError if `config` logs to W&B but the wandb package is not installed."""
    name = project(config)
    if name and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"config.logging.wandb_project={name!r} logs to Weights & Biases, but the wandb "
            "package is not installed. Install cnn_lab's wandb extra (pip install "
            "'cnn_lab[wandb]', or pip install wandb), or set "
            "--config.logging.wandb_project='' to log to metrics.jsonl and TensorBoard only."
        )


class WandbRun:
    """One W&B run per workdir: its id is kept in the workdir, so a resumed training (from
    any of its checkpoints) continues it, and a fresh start (which moves the id file aside
    with the other outputs) begins a new one. W&B's own files go to <workdir>/wandb/."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        """Start or resume the W&B run of `workdir` in `config`'s project, logging `config`."""
        import wandb

        id_file = Path(workdir) / WANDB_RUN_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self.run = wandb.init(
            project=project(config),
            id=run_id,
            name=Path(workdir).absolute().name,
            dir=str(workdir),
            resume="allow",
            reinit="finish_previous",  # A second run in one process (notebooks, tests).
        )
        # A resumed run may have changed fields (--allow_config_changes): the new values win.
        self.run.config.update(config.to_dict(), allow_val_change=True)
        id_file.write_text(self.run.id + "\n")
        # Steps W&B already holds (logged before a crash) are not logged again: W&B refuses
        # steps that go back, and an exact resume recomputes the same values.
        self._next_step = self.run.step

    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars {"split/name": value} at training step `step`."""
        if step >= self._next_step:
            self.run.log(values, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        """Log the image file at `path` (e.g. curves.png) as `name` at `step`."""
        import wandb

        self.log({name: wandb.Image(str(path))}, step)
