"""Log-probabilities over a split (with a predictors.make_predict_fn); scores and ensembles."""

import functools
import itertools
import math
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from cnn_lab.data import augment, pipeline
from cnn_lab.predictors import PredictFn
from cnn_lab.runtime import sharding


def modules_called(
    model: nn.Module,
    variables: dict,
    image_shape: tuple[int, ...],
    wanted: Callable[[nn.Module], bool],
) -> list[nn.Module]:
    """The `wanted` modules a forward pass (evaluation mode) of images (H, W, C) calls, in order,
    each once. Nothing is computed: shapes only."""
    seen: dict[tuple[str, ...], nn.Module] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and wanted(module):
            seen.setdefault(tuple(module.path), module)
        return next_fun(*args, **kwargs)

    def apply(variables, images):
        with nn.intercept_methods(record):
            return model.apply(variables, images, train=False)

    jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return list(seen.values())


def has_dropout(model: nn.Module, variables: dict, image_shape: tuple[int, ...]) -> bool:
    """Whether applying `model` to images of shape image_shape (H, W, C) calls a dropout of rate > 0."""
    return bool(
        modules_called(
            model, variables, image_shape, lambda m: isinstance(m, nn.Dropout) and m.rate > 0
        )
    )


def accepts_size(model: nn.Module, variables: dict, size: int, channels: int) -> bool:
    """Whether `model` with these variables can be applied to images (B, size, size, channels)."""
    images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    try:
        jax.eval_shape(functools.partial(model.apply, train=False), variables, images)
    except Exception:  # Flax and XLA raise many types for a shape mismatch; any means "no".
        return False
    return True


def _to_host(tree):
    """A tree of global arrays as numpy arrays holding every process's rows."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


@functools.cache
def _jitted(predict_fn: PredictFn, normalize: Callable, mesh: Mesh) -> Callable:
    """`predict_fn` on uint8 images, jitted once per function (snapshot members share it)."""
    replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    return jax.jit(
        sharding.traced_over(
            mesh, lambda variables, images, key: predict_fn(variables, normalize(images), key)
        ),
        in_shardings=(replicated, batch_sharded, replicated),
        out_shardings=batch_sharded,
    )


def predict(
    predict_fn: PredictFn,
    variables: dict,
    batches: Iterable[pipeline.Batch],
    data_config: ml_collections.ConfigDict,
    mesh: Mesh,
    key: jax.Array,
) -> tuple[np.ndarray, np.ndarray]:
    """(log_probs (N, K) float32, labels (N,) int32) of the real rows of `batches`, in order.

    `batches` are this process's rows of padded, masked uint8 batches {"image": (b, H, W, C),
    "label": (b,), "mask": (b,)} (`inputs.eval_batches`); the global batch splits over `mesh`.
    """
    fn = _jitted(
        predict_fn, augment.normalizer(tuple(data_config.mean), tuple(data_config.std)), mesh
    )
    outputs = []
    for index, batch in enumerate(batches):
        batch = sharding.to_global(batch, mesh)
        # Folding in the batch index gives each batch its own dropout masks.
        log_probs = fn(variables, batch["image"], jax.random.fold_in(key, index))
        if outputs:  # At most two batches in flight (see evaluate.evaluate).
            jax.block_until_ready(outputs[-1][0])
        outputs.append((log_probs, batch["label"], batch["mask"]))
    # Gathered after the loop, so the host prepares the next batch while the devices compute.
    host = _to_host(outputs)
    mask = np.concatenate([m for _, _, m in host])
    log_probs = np.concatenate([p for p, _, _ in host])[mask]
    labels = np.concatenate([y for _, y, _ in host])[mask]
    return log_probs.astype(np.float32), labels.astype(np.int32)


def scores(log_probs: np.ndarray, labels: np.ndarray, *, num_bins: int = 15) -> dict[str, float]:
    """accuracy, nll, ece (Guo et al. 2017, equal-width bins of top-1 probability) and count.

    log_probs (N, K), labels (N,).
    """
    log_probs = np.asarray(log_probs, np.float64)
    count = len(labels)
    confidence = np.exp(log_probs.max(axis=-1))
    correct = (log_probs.argmax(axis=-1) == labels).astype(np.float64)
    # Bin b holds confidences in (b / M, (b + 1) / M]; confidence >= 1/K > 0 always.
    bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
    # Per bin, |accuracy - confidence| * fraction = |sum(correct - confidence)| / N.
    gaps = np.bincount(bins, weights=correct - confidence, minlength=num_bins)
    return {
        "accuracy": float(correct.mean()),
        "nll": float(-log_probs[np.arange(count), labels].mean()),
        "ece": float(np.abs(gaps).sum() / count),
        "count": count,
    }


def ensemble(members: list[np.ndarray]) -> np.ndarray:
    """log of the mean probability of members, each (N, K) log-probabilities -> (N, K) float32."""
    stacked = np.stack([np.asarray(m, np.float64) for m in members])
    return (np.logaddexp.reduce(stacked, axis=0) - math.log(len(members))).astype(np.float32)


def disagreement(members: list[np.ndarray]) -> float:
    """Mean over pairs of members (N, K) of the fraction of examples whose top-1 classes differ."""
    top1 = [np.argmax(m, axis=-1) for m in members]
    pairs = [np.mean(a != b) for a, b in itertools.combinations(top1, 2)]
    return float(np.mean(pairs)) if pairs else 0.0
