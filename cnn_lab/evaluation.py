"""In-loop evaluation: metrics of variables over a split's padded batches, and BatchNorm
statistics re-estimated for averaged weights."""

import functools
import math
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from tqdm import tqdm

from cnn_lab import steps
from cnn_lab.data import pipeline
from cnn_lab.runtime import sharding


def evaluate(
    eval_fn: Callable,
    variables: dict,
    batches: Iterable[pipeline.Batch],
    mesh: Mesh,
    *,
    total: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Loss, top-1 (and top-5 past 5 classes) and per-class accuracy over padded, masked
    `batches` (this process's rows; `total` batches, for the progress bar)."""
    totals = None
    show = progress and jax.process_index() == 0
    for batch in tqdm(batches, desc=desc, total=total, leave=False, disable=not show):
        if totals is not None:
            # At most two batches in flight, as in training: a long queue of steps with
            # cross-device collectives was seen to deadlock 8 CPU devices on 2 cores.
            jax.block_until_ready(totals)
        sums = eval_fn(variables, sharding.to_global(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    result = {"loss": float(totals["loss"]) / count, "accuracy": float(totals["correct"]) / count}
    if len(totals["class_count"]) > 5:
        result["top5_accuracy"] = float(totals["correct_top5"]) / count
    result.update({k: float(v) / count for k, v in totals.items() if k not in steps.EVAL_SUMS})
    result["count"] = int(count)
    result["per_class_accuracy"] = [
        float(c) / float(n) if n else math.nan
        for c, n in zip(totals["class_correct"], totals["class_count"], strict=True)
    ]
    return result


def recompute_batch_stats(
    model: nn.Module,
    variables: dict,
    batches: Iterable[pipeline.Batch],
    mesh: Mesh,
    normalize: steps.Normalize | None = None,
) -> dict:
    """`variables` with BatchNorm statistics re-estimated over training `batches` (global).

    Each statistic becomes the mean over the batches of its batch value (SWA's recipe for
    averaged weights, whose activations match no single model's running statistics).
    """
    if not variables["batch_stats"]:
        return variables
    stats_after = _batch_stats_fn(model, mesh)
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    total, count = None, 0
    for batch in batches:
        images = batch["image"] if normalize is None else normalize(batch["image"])
        from_zeros = stats_after(variables, images, zeros)  # (1 - m) * batch value
        if total is None:
            ones = jax.tree.map(jnp.ones_like, zeros)
            momentum = jax.tree.map(jnp.subtract, stats_after(variables, images, ones), from_zeros)
            total = from_zeros
        else:
            total = jax.tree.map(jnp.add, jax.block_until_ready(total), from_zeros)
        count += 1
    stats = jax.tree.map(lambda t, m: t / (count * (1.0 - m)), total, momentum)
    return {**variables, "batch_stats": stats}


@functools.cache
def _batch_stats_fn(model: nn.Module, mesh: Mesh) -> Callable:
    """steps.batch_stats_sums jitted once per model and mesh (not once per evaluation)."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        functools.partial(steps.batch_stats_sums, model=model),
        in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
        out_shardings=replicated,
    )
