"""Where metrics go: metrics.jsonl, TensorBoard event files and the learning-curves plot."""

import json
import math
from pathlib import Path

# tensorboardX writes TensorBoard's event format without needing TensorBoard installed.
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricWriter:
    """Appends one JSON object per event; mirrors scalars to TensorBoard under `split/name`.

    Only one process of a multi-host run should write: pass `enabled=False` on the others.
    """

    def __init__(self, workdir: Path, *, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: records after it (written before a crash) are dropped and rewritten."""
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            path = self.workdir / METRICS_FILE
            kept = [
                r
                for r in read_metrics(self.workdir)
                if r["step"] <= resume_step and r["split"] != "test"
            ]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=resume_step + 1)

    def write(self, *, step: int, epoch: float, split: str, metrics: dict[str, float]) -> None:
        """Record `metrics` of `split` ("train", "val" or "test") at `step`."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(epoch, 4), "split": split, **metrics}
        with open(self.workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(f"{split}/{name}", value, step)
        self._tb.flush()

    def plot(self) -> Path | None:
        """Train and validation loss/accuracy against epochs, as curves.png in the workdir."""
        if not self.enabled:
            return None
        return plot_curves(self.workdir)


def read_metrics(workdir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl, in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
