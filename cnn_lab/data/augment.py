"""Training-time augmentations: jit-able JAX ones on device batches, randomness from a key.

Image augmentations take float32 images (B, H, W, C) in [0, 1] (before normalisation), draw
independent randomness per example from one key, and return the same shape and dtype;
`augment_batch` chains them for the train step.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from cnn_lab.data import mixing

# ImageNet RGB statistics of pixels in [0, 1] (fb.resnet.torch, timm): principal components.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# ITU-R 601 luma weights of R, G, B (torchvision's greyscale).
LUMA = (0.299, 0.587, 0.114)


def crop_at(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
    """Zero-pad images (B, H, W, C) by `padding`, crop back to (H, W) at offsets (B, 2) int32.

    Offset (0, 0) is the padded top-left corner; (padding, padding) is the image itself.
    """
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)


def pad_and_crop(images: jax.Array, key: jax.Array, padding: int) -> jax.Array:
    """CIFAR's random crop of images (B, H, W, C): `crop_at` offsets uniform in [0, 2 * padding]."""
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * padding + 1, jnp.int32)
    return crop_at(images, offsets, padding)


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Each image of (B, H, W, C) mirrored left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def random_resized_crop(
    images: jax.Array,
    key: jax.Array,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> jax.Array:
    """Inception's scale augmentation of images (B, H, W, C), resized back to (H, W) bilinearly.

    Per image: a box of area fraction uniform in `scale` and aspect ratio (width / height)
    log-uniform in `ratio`, clipped to the image, at a uniform position. `scale` and `ratio`
    may be traced.
    """
    batch, height, width, _ = images.shape
    area_key, ratio_key, position_key = jax.random.split(key, 3)
    area = height * width * jax.random.uniform(area_key, (batch,), minval=scale[0], maxval=scale[1])
    log_ratio = jnp.log(jnp.asarray(ratio, jnp.float32))
    aspect = jnp.exp(
        jax.random.uniform(ratio_key, (batch,), minval=log_ratio[0], maxval=log_ratio[1])
    )
    # Box sizes and corners are real numbers: the bilinear resize samples between pixels.
    size = jnp.stack(
        [
            jnp.minimum(jnp.sqrt(area / aspect), height),
            jnp.minimum(jnp.sqrt(area * aspect), width),
        ],
        axis=1,
    )  # (B, 2): box height, width
    image_size = jnp.array([[height, width]], jnp.float32)
    corner = jax.random.uniform(position_key, (batch, 2)) * (image_size - size)
    # scale_and_translate maps input coordinate x to x * zoom + shift: the box onto the image.
    zoom = image_size / size
    shift = -corner * zoom

    def resize(image: jax.Array, zoom: jax.Array, shift: jax.Array) -> jax.Array:
        return jax.image.scale_and_translate(
            image, image.shape, (0, 1), zoom, shift, method="linear"
        )

    return jax.vmap(resize)(images, zoom, shift).astype(images.dtype)


def _grey(images: jax.Array) -> jax.Array:
    """Luma (B, H, W, 1) of RGB or single-channel images (B, H, W, C)."""
    channels = images.shape[-1]
    if channels == 1:
        return images
    if channels != 3:
        raise ValueError(f"Colour augmentations need 1 or 3 channels; got {channels}.")
    return jnp.einsum("bhwc,c->bhw", images, jnp.asarray(LUMA, images.dtype))[..., None]


def _factors(key: jax.Array, images: jax.Array, strength: float) -> jax.Array:
    """Factors (B, 1, 1, 1) uniform in [1 - strength, 1 + strength], never below 0."""
    shape = (images.shape[0], 1, 1, 1)
    return jax.random.uniform(
        key, shape, images.dtype, minval=max(0.0, 1.0 - strength), maxval=1.0 + strength
    )


def _blend(images: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision's blend: factor * images + (1 - factor) * other, clipped to [0, 1]."""
    return jnp.clip(factor * images + (1 - factor) * other, 0.0, 1.0)


def color_jitter(
    images: jax.Array,
    key: jax.Array,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
) -> jax.Array:
    """torchvision's ColorJitter on images (B, H, W, C), in the fixed order of its arguments.

    Each factor is uniform in [1 - strength, 1 + strength] per image: brightness scales the
    image, contrast blends it with its mean grey, saturation with its greyscale (a no-op on
    one channel). A strength of 0 skips that step.
    """
    brightness_key, contrast_key, saturation_key = jax.random.split(key, 3)
    if brightness:
        images = jnp.clip(images * _factors(brightness_key, images, brightness), 0.0, 1.0)
    if contrast:
        mean_grey = jnp.mean(_grey(images), axis=(1, 2, 3), keepdims=True)
        images = _blend(images, mean_grey, _factors(contrast_key, images, contrast))
    if saturation:
        images = _blend(images, _grey(images), _factors(saturation_key, images, saturation))
    return images


def pca_lighting(
    images: jax.Array,
    key: jax.Array,
    *,
    std: float,
    eigval: tuple[float, ...] = IMAGENET_EIGVAL,
    eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC,
) -> jax.Array:
    """AlexNet's lighting noise on RGB images (B, H, W, 3): eigvec @ (alpha * eigval) per image.

    alpha ~ N(0, std) per image and component; the result is not clipped (as in AlexNet).
    """
    if not std:
        return images
    if images.shape[-1] != 3:
        raise ValueError(
            f"PCA lighting needs RGB images (3 channels); got {images.shape[-1]}. "
            "Set its strength to 0 for this data set."
        )
    alpha = std * jax.random.normal(key, (images.shape[0], 3), images.dtype)
    weights = alpha * jnp.asarray(eigval, images.dtype)[None, :]  # (B, 3)
    shift = weights @ jnp.asarray(eigvec, images.dtype).T  # (B, 3): row b is eigvec @ weights[b]
    return images + shift[:, None, None, :]


def random_erasing(
    images: jax.Array,
    key: jax.Array,
    *,
    probability: float,
    area: tuple[float, float],
    aspect: tuple[float, float],
) -> jax.Array:
    """Zhong et al.'s random erasing of images (B, H, W, C): a box of noise in some of them.

    Each image is erased with `probability`, by one box whose area fraction is uniform in
    `area` and whose height / width is uniform in `aspect` (the paper's draws), clipped to the
    image where it would overhang (the paper draws again instead) and placed uniformly inside
    it; the box's pixels are uniform in [0, 1], the paper's best filling on CIFAR.
    """
    batch, height, width, _ = images.shape
    erase_key, area_key, aspect_key, place_key, fill_key = jax.random.split(key, 5)
    erase = jax.random.bernoulli(erase_key, probability, (batch,))
    box_area = (
        height * width * jax.random.uniform(area_key, (batch,), minval=area[0], maxval=area[1])
    )
    box_aspect = jax.random.uniform(aspect_key, (batch,), minval=aspect[0], maxval=aspect[1])
    sides = jnp.stack([jnp.sqrt(box_area * box_aspect), jnp.sqrt(box_area / box_aspect)], axis=1)
    size = jnp.array([[height, width]], jnp.float32)  # (1, 2)
    sides = jnp.clip(jnp.round(sides), 1, size)  # (B, 2): rows, columns
    low = jnp.floor(jax.random.uniform(place_key, (batch, 2)) * (size - sides + 1))
    box = mixing.box_masks(low, low + sides, height, width) & erase[:, None, None]
    noise = jax.random.uniform(fill_key, images.shape, images.dtype)
    return jnp.where(box[..., None], noise, images)


def _normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """(images - mean) / std per channel, for float images (B, H, W, C)."""
    mean = jnp.asarray(mean, jnp.float32)[None, None, None, :]
    std = jnp.asarray(std, jnp.float32)[None, None, None, :]
    return (images - mean) / std


def eval_preprocess(
    images: jax.Array, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> jax.Array:
    """Normalised float32 images (B, H, W, C) from uint8 ones, as `augment_batch` makes them."""
    return _normalize(images.astype(jnp.float32) / 255.0, mean, std)


def augment_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    augment_config: ml_collections.ConfigDict,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
) -> tuple[jax.Array, jax.Array]:
    """Augmented, normalised float32 images (B, H, W, C) and targets (B, num_classes).

    From uint8 images (B, H, W, C) and int labels (B,): whatever `augment_config` switches on
    (fields crop_padding, flip, resized_crop, resized_crop_scale, resized_crop_ratio,
    brightness, contrast, saturation, pca_lighting, random_erasing, random_erasing_area,
    random_erasing_aspect, mixup_alpha, cutmix_alpha), in the order resized crop, pad-and-crop,
    flip, colour jitter, PCA lighting, random erasing, then normalisation and mixup or cutmix (one of the two per batch, at random, when both are on). With everything
    off: `eval_preprocess(images)` and one-hot labels.
    """
    config = augment_config
    # One key per step whatever is on, so switching one step leaves the others' draws alone.
    # A new step's key goes last: split(key, n + 1) begins with split(key, n).
    keys = jax.random.split(key, 7)
    resize_key, crop_key, flip_key, jitter_key, lighting_key, mix_key, erase_key = keys
    images = images.astype(jnp.float32) / 255.0
    if config.resized_crop:
        images = random_resized_crop(
            images,
            resize_key,
            scale=tuple(config.resized_crop_scale),
            ratio=tuple(config.resized_crop_ratio),
        )
    if config.crop_padding:
        images = pad_and_crop(images, crop_key, config.crop_padding)
    if config.flip:
        images = random_flip(images, flip_key)
    images = color_jitter(
        images,
        jitter_key,
        brightness=config.brightness,
        contrast=config.contrast,
        saturation=config.saturation,
    )
    images = pca_lighting(images, lighting_key, std=config.pca_lighting)
    if config.random_erasing:
        images = random_erasing(
            images,
            erase_key,
            probability=config.random_erasing,
            area=tuple(config.random_erasing_area),
            aspect=tuple(config.random_erasing_aspect),
        )
    images = _normalize(images, mean, std)
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if config.mixup_alpha and config.cutmix_alpha:
        return mixing.mixup_or_cutmix(
            images,
            targets,
            mix_key,
            mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha,
        )
    # At most one of the two is on; the other returns its inputs.
    images, targets = mixing.mixup(images, targets, mix_key, config.mixup_alpha)
    return mixing.cutmix(images, targets, mix_key, config.cutmix_alpha)


def check_flip(
    augment_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict
) -> None:
    """Raise ValueError if random flips are asked of a data set whose mirrored images change label."""
    if augment_config.flip and not data_config.flip_preserves_label:
        raise ValueError(
            f"config.augment.flip=True, but a mirrored {data_config.name} image can change its "
            "label (config.data.flip_preserves_label=False). Set --config.augment.flip=False."
        )


def check_random_erasing(augment_config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a random-erasing probability or box range that cannot be drawn."""
    config = augment_config
    low_area, high_area = config.random_erasing_area
    low_aspect, high_aspect = config.random_erasing_aspect
    if not 0 <= config.random_erasing <= 1:
        raise ValueError(
            f"config.augment.random_erasing={config.random_erasing!r} is the probability of "
            "erasing a box of an image: it must lie in [0, 1]. Set e.g. "
            "--config.augment.random_erasing=0.5 (0 switches it off)."
        )
    if not (0 < low_area <= high_area <= 1 and 0 < low_aspect <= high_aspect):
        raise ValueError(
            f"config.augment.random_erasing_area={tuple(config.random_erasing_area)!r} and "
            f"random_erasing_aspect={tuple(config.random_erasing_aspect)!r} must be (low, high) "
            "ranges with 0 < low <= high, the area fractions at most 1. Set e.g. "
            "--config.augment.random_erasing_area='(0.02, 0.4)' "
            "--config.augment.random_erasing_aspect='(0.3, 3.3)'."
        )


def crop_ranges(augment_config: ml_collections.ConfigDict) -> tuple | None:
    """(scale, ratio) of the config's random-resized crops, or None when they are off."""
    if not augment_config.resized_crop:
        return None
    return tuple(augment_config.resized_crop_scale), tuple(augment_config.resized_crop_ratio)


def train_preprocess(config: ml_collections.ConfigDict, *, crops_on_host: bool = False) -> Callable:
    """The run's `augment_batch` (config.augment, config.data statistics): the train step's preprocess.

    `crops_on_host`: the input already took the random-resized crops (streaming), so the
    devices do not crop again.
    """
    augment_config = config.augment
    if crops_on_host:
        augment_config = ml_collections.ConfigDict(
            {**augment_config.to_dict(), "resized_crop": False}
        )
    return functools.partial(
        augment_batch,
        augment_config=augment_config,
        mean=tuple(config.data.mean),
        std=tuple(config.data.std),
        num_classes=config.model.num_classes,
    )


@functools.cache
def normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """`eval_preprocess` with these statistics; one object per statistics, so jit caches hit."""
    return functools.partial(eval_preprocess, mean=mean, std=std)
