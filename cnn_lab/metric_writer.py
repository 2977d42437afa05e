"""Where metrics go: metrics.jsonl, TensorBoard event files, the learning-curves plot and
optionally Weights & Biases; the train metrics of each logging window."""

import json
import math
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from cnn_lab import wandb_writer
from cnn_lab.checkpoint import BROKEN_DIR, LATEST_DIR
from cnn_lab.models import metric_warnings
from cnn_lab.workdir import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR, read_metrics


def _tensorboard_writer(logdir: Path, purge_step: int):
    """tensorboardX's SummaryWriter (TensorBoard's event format without TensorBoard installed),
    imported without torch."""
    # tensorboardX imports torch where it is installed (seconds, about 180 MB resident) only to
    # accept torch tensors, which cnn_lab never passes it. A None module makes the import fail.
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir), purge_step=purge_step)


class MetricWriter:
    """Appends one JSON object per event; mirrors scalars to TensorBoard (and W&B) under
    `split/name`.

    Only one process of a multi-host run should write: pass `enabled=False` on the others.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        enabled: bool = True,
        resume_step: int = 0,
        config: ml_collections.ConfigDict | None = None,
    ):
        """`resume_step`: records after it (written before a crash) are dropped and rewritten.

        `config`: the run's, logged to Weights & Biases with the metrics and curves when its
        logging.wandb_project is set.
        """
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        self._step = resume_step  # Of the last record written.
        if enabled and config is not None and wandb_writer.project(config):
            self._wandb = wandb_writer.WandbRun(self.workdir, config)
        if enabled:
            path = self.workdir / METRICS_FILE
            kept = [
                r
                for r in read_metrics(self.workdir)
                if r["step"] <= resume_step and r["split"] != "test"
            ]
            tmp = path.with_name(METRICS_FILE + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)
            self._tb = _tensorboard_writer(self.workdir / TENSORBOARD_DIR, resume_step + 1)

    def write(self, *, step: int, epoch: float, split: str, metrics: dict[str, float]) -> None:
        """Record `metrics` of `split` ("train", "val" or "test") at `step`."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 4), "split": split, **metrics}
        with open(self.workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {
            f"{split}/{name}": value
            for name, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
        for name, value in scalars.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step)
        self._step = step

    def plot(self) -> Path | None:
        """Train and validation loss/accuracy against epochs, as curves.png in the workdir."""
        if not self.enabled:
            return None
        path = plot_curves(self.workdir)
        if self._wandb is not None:
            self._wandb.log_image("curves", path, self._step)
        return path


def plot_curves(workdir: Path) -> Path:
    """Draw the "monitoring learning" plot of a run's metrics.jsonl into curves.png."""
    import matplotlib

    matplotlib.use("Agg")  # Files only: training machines have no display.
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("train", "-"), ("val", "o-")):
            points = [(r["epoch"], r[name]) for r in records if r["split"] == split and name in r]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=split, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(workdir) / CURVES_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean_metrics(pending: list[dict], first_step: int, resumed_at: int) -> dict[str, float]:
    """Average a window of step metrics; halt on the first non-finite loss or gradient.

    A float16 step whose gradients overflowed was skipped (its "skipped_steps" is 1): loss
    scaling handles it, so only its loss must be finite. "skipped_steps" is summed over the
    window, and "grad_norm" averaged over the steps taken (absent if none was).
    `resumed_at`: the step this process resumed from (0: it started afresh).
    """
    stacked = jax.device_get(pending)
    for offset, metrics in enumerate(stacked):
        skipped = metrics.get("skipped_steps", 0)
        if not (np.isfinite(metrics["loss"]) and (skipped or np.isfinite(metrics["grad_norm"]))):
            step = first_step + offset + 1
            # The first step after a resume computes on the checkpoint alone: blame it first.
            fix = (
                f"This is the first step after resuming from step {resumed_at}: its checkpoint "
                f"is suspect. Move {LATEST_DIR}/{resumed_at} into the workdir's "
                f"{BROKEN_DIR}/ and rerun to resume from the step before."
                if resumed_at and step == resumed_at + 1
                else "Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
            )
            if "skipped_steps" in metrics:  # Loss scaling cannot rescue the forward pass.
                fix += " float16 activations overflow past 65504: bfloat16 or float32 do not."
            raise FloatingPointError(
                f"Non-finite loss or gradient at step {step} (loss={metrics['loss']}, "
                f"grad_norm={metrics['grad_norm']}). Training stopped; checkpoints saved before "
                f"this step are kept. {fix}"
            )
    means = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
    if "skipped_steps" in means:
        means["skipped_steps"] = float(sum(m["skipped_steps"] for m in stacked))
        taken = [m["grad_norm"] for m in stacked if not m["skipped_steps"]]
        means.pop("grad_norm")
        if taken:
            means["grad_norm"] = float(np.mean(taken))
    return means


class TrainWindow:
    """The train metrics of the steps since the last write: kept on device, then checked
    finite, averaged and written (with images/s) at log time."""

    def __init__(
        self, writer: MetricWriter, batch_size: int, steps_per_epoch: int, step: int, is_lead: bool
    ):
        """A window starting after `step`, of steps of `batch_size` examples."""
        self.writer, self.batch_size, self.is_lead = writer, batch_size, is_lead
        self.steps_per_epoch = steps_per_epoch
        self.pending: list[dict] = []  # pending[i]: the metrics of step first_step + i + 1.
        self.first_step, self.start = step, time.perf_counter()
        self.resumed_at = step
        self.last: dict[str, float] = {}  # The means of the last window written.

    def add(self, metrics: dict) -> None:
        """Keep one step's metrics, after waiting for the step before it."""
        if self.pending:
            # At most two steps in flight: the host prepares the next batch while the devices
            # compute, and XLA never has a long queue of steps whose cross-device collectives
            # could interleave (seen to deadlock with 8 CPU devices on 2 cores).
            jax.block_until_ready(self.pending[-1])
        self.pending.append(metrics)

    def write(self, step: int) -> dict[str, float]:
        """Write the window's means at `step` (halting on non-finite ones); the last ones written."""
        if not self.pending:
            return self.last
        metrics = _mean_metrics(self.pending, self.first_step, self.resumed_at)
        elapsed = time.perf_counter() - self.start
        metrics["images_per_second"] = len(self.pending) * self.batch_size / elapsed
        self.writer.write(
            step=step, epoch=step / self.steps_per_epoch, split="train", metrics=metrics
        )
        # Models declare sown metrics that must stay 0 (models.METRIC_WARNINGS).
        for warning in metric_warnings(metrics) if self.is_lead else ():
            print(f"Warning: steps {self.first_step + 1}-{step}: {warning}")
        self.pending, self.first_step, self.start = [], step, time.perf_counter()
        self.last = metrics
        return metrics
