"""Label-mixing augmentations: mixup and CutMix of float images (B, H, W, C) and targets (B, K).

Each row is mixed with its partner, the row B - 1 - i of the batch (a fixed pairing, so no
permutation is drawn), by one lambda per batch; `cnn_lab.data.augment` applies them last,
and draws its random erasing's boxes with `box_masks` too.
"""

import functools

import jax
import jax.numpy as jnp


def _with_partner(x: jax.Array, lam: jax.Array) -> jax.Array:
    """lam * x + (1 - lam) * x reversed along the batch (each row's partner)."""
    return lam * x + (1 - lam) * x[::-1]


def mix(images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mixup with a given lambda: images (B, ...) and targets (B, K) blended with their partners.

    The partner of row i is row B - 1 - i: a fixed pairing, so no permutation is drawn.
    """
    return _with_partner(images, lam), _with_partner(targets, lam)


def box_masks(low: jax.Array, high: jax.Array, height: int, width: int) -> jax.Array:
    """Masks (N, height, width) of boxes from corners `low` to `high` (N, 2) (rows, columns).

    A box holds the pixels from low (included) to high (excluded); parts off the image drop.
    """
    row, col = jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32)
    rows = (row[None, :] >= low[:, :1]) & (row[None, :] < high[:, :1])
    cols = (col[None, :] >= low[:, 1:]) & (col[None, :] < high[:, 1:])
    return rows[:, :, None] & cols[:, None, :]


def cut(
    images: jax.Array, targets: jax.Array, lam: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """CutMix with a given lambda: images (B, H, W, C) get a box of their partner's pixels.

    One box for the batch, of area fraction about 1 - lam, centred uniformly and clipped to
    the image; targets (B, K) are mixed by the area actually pasted. Partners as in `mix`.
    """
    _, height, width, _ = images.shape
    size = jnp.array([height, width], jnp.float32)
    centre = jax.random.uniform(key, (2,)) * size
    half_side = jnp.sqrt(1 - lam).astype(jnp.float32) * size / 2
    low, high = jnp.round(centre - half_side), jnp.round(centre + half_side)
    box = box_masks(low[None], high[None], height, width)[0]
    pasted = jnp.mean(box.astype(targets.dtype))
    images = jnp.where(box[None, :, :, None], images[::-1], images)
    return images, _with_partner(targets, 1 - pasted)


def mixup(
    images: jax.Array, targets: jax.Array, key: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """Mixup (Zhang et al.) of images (B, H, W, C) and targets (B, K), lambda ~ Beta(alpha, alpha).

    One lambda for the batch; alpha = 0 returns the inputs.
    """
    if not alpha:
        return images, targets
    return mix(images, targets, jax.random.beta(key, alpha, alpha, dtype=images.dtype))


def cutmix(
    images: jax.Array, targets: jax.Array, key: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
    """CutMix (Yun et al.) of images (B, H, W, C) and targets (B, K), lambda ~ Beta(alpha, alpha).

    One lambda and box for the batch (see `cut`); alpha = 0 returns the inputs.
    """
    if not alpha:
        return images, targets
    lam_key, box_key = jax.random.split(key)
    return cut(images, targets, jax.random.beta(lam_key, alpha, alpha, dtype=images.dtype), box_key)


def mixup_or_cutmix(
    images: jax.Array,
    targets: jax.Array,
    key: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
) -> tuple[jax.Array, jax.Array]:
    """`mixup` or `cutmix` of images (B, H, W, C) and targets (B, K), each with probability 1/2."""
    choice_key, lam_key, box_key = jax.random.split(key, 3)
    use_mixup = jax.random.bernoulli(choice_key)
    # One Beta draw with the chosen alpha: its sampler's loop is slow to compile, so not twice.
    alpha = jnp.where(use_mixup, mixup_alpha, cutmix_alpha)
    lam = jax.random.beta(lam_key, alpha, alpha, dtype=images.dtype)
    return jax.lax.cond(use_mixup, mix, functools.partial(cut, key=box_key), images, targets, lam)
