"""Log-probabilities over a split with test-time augmentation or MC dropout; scores and ensembles."""

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
from cnn_lab.runtime import sharding

VARIANTS = ("plain", "flip", "crops", "scales", "mc_dropout")

PredictFn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def _log_mean_prob(logits: jax.Array) -> jax.Array:
    """log of the mean softmax over views: logits (V, B, K) -> (B, K) float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - math.log(logits.shape[0])


def _resize(images: jax.Array, size: int) -> jax.Array:
    """images (B, H, W, C) -> (B, size, size, C), bilinear."""
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


def crop_views(images: jax.Array, image_size: int, crop_fraction: float, flip: bool) -> jax.Array:
    """The AlexNet views of images (B, H, W, C): (V, B, image_size, image_size, C), V = 5 or 10.

    The batch is resized to side round(image_size / crop_fraction); the views are its top-left,
    top-right, bottom-left, bottom-right and centre crops, then (flip) their mirror images.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
    resized = _resize(images, round(image_size / crop_fraction))
    far = resized.shape[1] - image_size
    offsets = [(0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2)]
    views = jnp.stack([resized[:, i : i + image_size, j : j + image_size, :] for i, j in offsets])
    return jnp.concatenate([views, views[:, :, :, ::-1, :]]) if flip else views


def _mc_dropout_interceptor(next_fun, args, kwargs, context):
    """Run every inactive nn.Dropout as flax's own active dropout, drawing from its RNG stream."""
    module = context.module
    # A dropout that is already active (including the one made here) runs unchanged.
    if (
        not isinstance(module, nn.Dropout)
        or context.method_name != "__call__"
        or module.deterministic is False
    ):
        return next_fun(*args, **kwargs)
    active = nn.Dropout(
        rate=module.rate,
        broadcast_dims=module.broadcast_dims,
        deterministic=False,
        rng_collection=module.rng_collection,
    )
    return active.apply(
        {}, args[0], rngs={module.rng_collection: module.make_rng(module.rng_collection)}
    )


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


def make_predict_fn(
    model: nn.Module,
    variant: str,
    *,
    image_size: int,
    flip: bool,
    crop_fraction: float,
    scales: tuple[int, ...],
    mc_samples: int,
) -> PredictFn:
    """fn(variables, images (B, H, W, C), key) -> (B, K) float32 log of the mean probability over views.

    "scales" needs a model that accepts every size in `scales` (see `accepts_size`), and
    "mc_dropout" one with dropout (see `has_dropout`); `key` is used by "mc_dropout" only.
    """

    def apply(variables: dict, images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False)

    def over_views(variables: dict, views: jax.Array) -> jax.Array:
        # One view at a time: compiles the model once and holds one view's activations.
        return _log_mean_prob(jax.lax.map(functools.partial(apply, variables), views))

    def plain(variables, images, key):
        return _log_mean_prob(apply(variables, images)[None])

    def flipped(variables, images, key):
        return over_views(variables, jnp.stack([images, images[:, :, ::-1, :]]))

    def crops(variables, images, key):
        return over_views(variables, crop_views(images, image_size, crop_fraction, flip))

    def multiscale(variables, images, key):
        # Sizes differ, so views cannot be stacked; one traced apply per size.
        logits = [apply(variables, images)]
        logits += [apply(variables, _resize(images, size)) for size in scales]
        return _log_mean_prob(jnp.stack(logits))

    def mc_dropout(variables, images, key):
        # train=False keeps BatchNorm on running statistics and stochastic depth off.
        def sample(k):
            with nn.intercept_methods(_mc_dropout_interceptor):
                return model.apply(variables, images, train=False, rngs={"dropout": k})

        return _log_mean_prob(jax.lax.map(sample, jax.random.split(key, mc_samples)))

    fns = {
        "plain": plain,
        "flip": flipped,
        "crops": crops,
        "scales": multiscale,
        "mc_dropout": mc_dropout,
    }
    if variant not in fns:
        raise ValueError(f"Unknown prediction variant {variant!r}. Known: {', '.join(VARIANTS)}.")
    return fns[variant]


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
        lambda variables, images, key: predict_fn(variables, normalize(images), key),
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
