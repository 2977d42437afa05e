"""Predict functions for finished runs: plain, test-time augmentation, MC dropout."""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ("plain", "flip", "crops", "scales", "mc_dropout")
# (variables, normalised images (B, H, W, C), key) -> (B, K) float32 log-probabilities.
PredictFn = Callable[[dict, jax.Array, jax.Array], jax.Array]


def _log_mean_prob(logits: jax.Array) -> jax.Array:
    """log of the mean softmax over views: logits (V, B, K) -> (B, K) float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.logsumexp(log_probs, axis=0) - math.log(logits.shape[0])


def _resize(images: jax.Array, size: int) -> jax.Array:
    """images (B, H, W, C) -> (B, size, size, C), bilinear."""
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear")


def crop_views(
    images: jax.Array,
    image_size: int,
    crop_fraction: float,
    flip: bool,
    padding: int = 0,
    fill: tuple[float, ...] = (0.0,),
) -> jax.Array:
    """The crop views of images (B, H, W, C): (V, B, image_size, image_size, C), V = 5 or 10.

    With `padding` (a run trained on pad-and-crop shifts): the top-left, top-right,
    bottom-left, bottom-right and centre crops of the batch padded by `padding` with `fill`
    per channel, i.e. shifts by up to `padding` as in training (the centre is the image).
    Without: AlexNet's, the same five crops of the batch resized to side
    round(image_size / crop_fraction). Then (flip) their mirror images.
    """
    if padding:
        fill = jnp.asarray(fill, images.dtype)[None, None, None, :]
        pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
        source = jnp.pad(images - fill, pad) + fill
    else:
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
        source = _resize(images, round(image_size / crop_fraction))
    far = source.shape[1] - image_size
    offsets = [(0, 0), (0, far), (far, 0), (far, far), (far // 2, far // 2)]
    views = jnp.stack([source[:, i : i + image_size, j : j + image_size, :] for i, j in offsets])
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


def make_predict_fn(
    model: nn.Module,
    variant: str,
    *,
    image_size: int,
    flip: bool,
    crop_fraction: float,
    scales: tuple[int, ...],
    mc_samples: int,
    crop_padding: int = 0,
    crop_fill: tuple[float, ...] = (0.0,),
) -> PredictFn:
    """fn(variables, images (B, H, W, C), key) -> (B, K) float32 log of the mean probability over views.

    "crops" takes `crop_views` (shifts by `crop_padding`, filled with `crop_fill`, where set).

    "scales" needs a model that accepts every size in `scales` (tools.predict.accepts_size),
    and "mc_dropout" one with dropout (tools.predict.has_dropout); only "mc_dropout" uses `key`.
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
        views = crop_views(images, image_size, crop_fraction, flip, crop_padding, crop_fill)
        return over_views(variables, views)

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
