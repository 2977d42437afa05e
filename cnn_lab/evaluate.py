"""Evaluate runs: `python -m cnn_lab.evaluate --workdir=<dir> [--checkpoint=best] [--split=test]`."""

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from tqdm import tqdm

from cnn_lab import checkpoint, sharding, steps
from cnn_lab.data import pipeline


def make_eval_fn(model: nn.Module, mesh: Mesh) -> Callable:
    """eval_step jitted over `mesh`: replicated variables, batch split over the data axis."""
    return jax.jit(
        functools.partial(steps.eval_step, model=model),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def evaluate(
    eval_fn: Callable,
    variables: dict,
    split: pipeline.Split,
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    mesh: Mesh,
    *,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Loss, top-1 (and top-5 past 5 classes) and per-class accuracy over every example once."""
    batches = pipeline.eval_batches(
        split,
        data_config,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    totals = None
    show = progress and jax.process_index() == 0
    for batch in tqdm(
        batches, desc=desc, total=math.ceil(len(split) / batch_size), leave=False, disable=not show
    ):
        sums = eval_fn(variables, sharding.to_global(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    result = {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}
    if len(totals["class_count"]) > 5:
        result["top5_accuracy"] = float(totals["correct_top5"]) / count
    result.update({k: float(v) / count for k, v in totals.items() if k.startswith("ode_")})
    result["count"] = int(count)
    result["per_class_accuracy"] = [
        float(c) / float(n) if n else math.nan
        for c, n in zip(totals["class_correct"], totals["class_count"], strict=True)
    ]
    return result


def split_string(data_config: ml_collections.ConfigDict, split: str) -> str:
    """The TFDS split string of "train", "val" or "test" in this config; others pass through."""
    named = {
        "train": data_config.train_split,
        "val": data_config.validation_split,
        "test": data_config.test_split,
    }
    return named.get(split, split)


def evaluate_run(workdir: str | Path, checkpoint_name: str = "best", split: str = "test") -> dict:
    """Restore a run's checkpoint, evaluate it on `split`, write eval_<checkpoint>_<split>.json."""
    model, variables, config, step = checkpoint.restore_for_inference(workdir, checkpoint_name)
    mesh = sharding.make_mesh()
    # Padding and masking make any batch size exact: round up to split over these devices.
    batch_size = -(-config.eval.batch_size // mesh.size) * mesh.size
    data = pipeline.load(config.data, split_string(config.data, split))
    variables = jax.device_put(variables, sharding.replicated(mesh))
    result = evaluate(make_eval_fn(model, mesh), variables, data, config.data, batch_size, mesh)
    result = {
        "workdir": str(workdir),
        "checkpoint": checkpoint_name,
        "step": step,
        "split": split,
        **result,
    }
    name = f"eval_{checkpoint_name}_{split}.json".replace("/", "_").replace(":", "_")
    (Path(workdir) / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(results: list[dict]) -> str:
    """One row per evaluated run, then each run's per-class accuracy."""
    header = f"{'workdir':<32} {'checkpoint':>12} {'split':>8} {'loss':>8} {'top-1':>7} {'top-5':>7} {'n':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        top5 = f"{r['top5_accuracy']:.4f}" if "top5_accuracy" in r else "-"
        lines.append(
            f"{r['workdir'][-32:]:<32} {r['checkpoint'] + '@' + str(r['step']):>12} "
            f"{r['split'][:8]:>8} {r['loss']:8.4f} {r['accuracy']:7.4f} {top5:>7} {r['count']:>7}"
        )
    for r in results:
        per_class = "  ".join(f"{k}: {a:.3f}" for k, a in enumerate(r["per_class_accuracy"]))
        lines.append(f"per-class accuracy, {r['workdir'][-40:]}: {per_class}")
    return "\n".join(lines)


def main() -> None:
    """Command line: one or more --workdir, --checkpoint, --split."""
    from absl import app, flags, logging

    workdirs = flags.DEFINE_multi_string("workdir", None, "Run directory; repeat for several.")
    which = flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
    split = flags.DEFINE_string("split", "test", "train | val | test | any TFDS split string.")
    flags.mark_flags_as_required(["workdir"])

    def run(argv: list[str]) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)
        try:
            results = [evaluate_run(w, which.value, split.value) for w in workdirs.value]
        except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as error:
            sys.exit(f"error: {error}")  # The message says what to change; no traceback.
        print(format_table(results))

    app.run(run)


if __name__ == "__main__":
    main()
