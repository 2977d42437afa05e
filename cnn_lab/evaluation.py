"""In-loop evaluation: metrics of variables over a split's padded batches, BatchNorm statistics
re-estimated for averaged weights, and a run's raw model beside its averages."""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh
from tqdm import tqdm

from cnn_lab import steps
from cnn_lab.averaging import Averaging
from cnn_lab.data import inputs, pipeline
from cnn_lab.runtime import sharding
from cnn_lab.state import TrainState

# What each average reports, as "<average>_<metric>" beside the raw model's metrics.
_AVERAGE_METRICS = ("loss", "accuracy", "top5_accuracy")


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
    # disable=None (here and in training): a bar on a terminal only, none in redirected logs.
    for batch in tqdm(batches, desc=desc, total=total, leave=False, disable=None if show else True):
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
        sharding.traced_over(mesh, functools.partial(steps.batch_stats_sums, model=model)),
        in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
        out_shardings=replicated,
    )


@dataclasses.dataclass(frozen=True)
class SideBySide:
    """Evaluates a training run's raw model and each of its parameter averages on one split."""

    model: nn.Module
    data: inputs.Inputs
    eval_fn: Callable  # steps.make_eval_fn
    read_averages: Callable  # averaging.Averaging.read, jitted
    names: tuple[str, ...]  # The averages kept, in the order they are reported.
    normalize: steps.Normalize
    batch_size: int
    # Train batches over which averages' BatchNorm statistics are re-estimated (None: kept).
    recompute_batches: int | None
    progress: bool

    @classmethod
    def for_run(
        cls,
        model: nn.Module,
        data: inputs.Inputs,
        averages: Averaging,
        normalize: steps.Normalize,
        eval_config: ml_collections.ConfigDict,
        averaging_config: ml_collections.ConfigDict,
        progress: bool,
    ) -> "SideBySide":
        """The evaluation of a training run on `data`, batched by config.eval, with the
        `averages` it keeps (their statistics as config.averaging.batch_stats says)."""
        recompute = averaging_config.batch_stats == "recompute"
        return cls(
            model,
            data,
            steps.make_eval_fn(model, data.mesh, normalize),
            jax.jit(averages.read, out_shardings=sharding.replicated(data.mesh)),
            averages.names,
            normalize,
            eval_config.batch_size,
            averaging_config.recompute_batches if recompute else None,
            progress,
        )

    def variants(self, state: TrainState, step: int) -> dict[str, dict]:
        """The variables evaluated side by side after `step` steps: the raw model's, then each
        average's."""
        variants = {"raw": state.variables}
        for name, variables in self.read_averages(state.averages, state.step).items():
            if self.recompute_batches is not None:
                batches = self.data.train_batches(epoch=step // self.data.steps_per_epoch)
                batches = itertools.islice(batches, self.recompute_batches)
                variables = recompute_batch_stats(
                    self.model, variables, batches, self.data.mesh, self.normalize
                )
            variants[name] = variables
        return variants

    def __call__(self, state: TrainState, step: int, split: str) -> dict:
        """Metrics of the raw model on `split`, and "<average>_loss" etc. of each average."""
        results = {}
        for name, variables in self.variants(state, step).items():
            metrics = evaluate(
                self.eval_fn,
                variables,
                self.data.eval_batches(split, self.batch_size),
                self.data.mesh,
                total=math.ceil((self.data.num_examples(split) or 0) / self.batch_size) or None,
                progress=self.progress,
                desc=f"{split} ({name})",
            )
            if name != "raw":
                metrics = {f"{name}_{k}": v for k, v in metrics.items() if k in _AVERAGE_METRICS}
            results |= metrics
        return results

    def accuracies(self, metrics: dict) -> str:
        """ "ema 0.9911 polyak 0.9900 " for the averages kept ("" for none)."""
        return "".join(f"{name} {metrics[f'{name}_accuracy']:.4f} " for name in self.names)
