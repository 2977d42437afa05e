"""On-device augmentations: shapes, determinism, identities, mixing, and the sharded entry point."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_lab import losses
from cnn_lab.data import augment, mixing, pipeline

KEY = jax.random.PRNGKey(0)
OTHER_KEY = jax.random.PRNGKey(1)


def _images(batch=8, size=6, channels=3, seed=0):
    """Random float32 images (B, size, size, C) in [0, 1], no two pixels equal."""
    return np.random.default_rng(seed).random((batch, size, size, channels), np.float32)


def _config(**overrides):
    """An augment config with everything off, then `overrides`."""
    fields = dict(
        crop_padding=0,
        flip=False,
        resized_crop=False,
        resized_crop_scale=(0.08, 1.0),
        resized_crop_ratio=(3 / 4, 4 / 3),
        brightness=0.0,
        contrast=0.0,
        saturation=0.0,
        pca_lighting=0.0,
        random_erasing=0.0,
        random_erasing_area=(0.02, 0.4),
        random_erasing_aspect=(0.3, 1 / 0.3),
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
    )
    return ml_collections.ConfigDict({**fields, **overrides})


# Jitted, as running a vmapped resize op by op is slow; scale and ratio are traced, so every
# test of it shares one compilation.
resized_crop = jax.jit(augment.random_resized_crop)

AUGMENTATIONS = {
    "pad_and_crop": jax.jit(functools.partial(augment.pad_and_crop, padding=2)),
    "random_flip": jax.jit(augment.random_flip),
    "random_resized_crop": functools.partial(resized_crop, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)),
    "color_jitter": jax.jit(
        functools.partial(augment.color_jitter, brightness=0.4, contrast=0.4, saturation=0.4)
    ),
    "pca_lighting": jax.jit(functools.partial(augment.pca_lighting, std=0.1)),
    "random_erasing": jax.jit(
        functools.partial(augment.random_erasing, probability=1.0, area=(0.1, 0.4), aspect=(0.5, 2))
    ),
}


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentation_keeps_shape_and_dtype_and_is_a_function_of_the_key(name):
    images = _images()
    out = AUGMENTATIONS[name](images, KEY)
    assert out.shape == images.shape
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, AUGMENTATIONS[name](images, KEY))
    assert not np.array_equal(out, AUGMENTATIONS[name](images, OTHER_KEY))
    assert not np.array_equal(out, images)
    if name != "pca_lighting":  # lighting noise is not clipped, as in AlexNet
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_crop_at_offset_zero_is_the_padded_corner_and_offset_padding_the_image():
    images = _images(batch=3)
    out = augment.crop_at(images, jnp.array([[0, 0], [2, 2], [1, 3]], jnp.int32), 2)
    np.testing.assert_array_equal(out[0, 2:, 2:], images[0, :-2, :-2])
    assert not np.asarray(out[0, :2]).any() and not np.asarray(out[0, :, :2]).any()
    np.testing.assert_array_equal(out[1], images[1])
    padded = np.pad(np.asarray(images[2]), ((2, 2), (2, 2), (0, 0)))
    np.testing.assert_array_equal(out[2], padded[1 : 1 + images.shape[1], 3 : 3 + images.shape[2]])


def test_pad_and_crop_offsets_cover_the_whole_range():
    padding = 1
    images = _images(batch=32, size=4)
    out = np.asarray(augment.pad_and_crop(images, KEY, padding))
    candidates = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    crops = {
        offset: np.asarray(augment.crop_at(images, jnp.array([offset] * 32, jnp.int32), padding))
        for offset in candidates
    }
    used = [next(o for o in candidates if np.array_equal(out[i], crops[o][i])) for i in range(32)]
    assert set(used) == set(candidates)  # 32 draws of 9 offsets (this key hits them all)


def test_random_flip_mirrors_some_images_and_leaves_the_others():
    images = _images(batch=16)
    out = np.asarray(augment.random_flip(images, KEY))
    flipped = [np.array_equal(out[i], images[i, :, ::-1]) for i in range(16)]
    kept = [np.array_equal(out[i], images[i]) for i in range(16)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # exactly one of the two
    assert 0 < sum(flipped) < 16


def test_resized_crop_of_the_whole_image_is_the_identity():
    images = _images()
    out = resized_crop(images, KEY, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(out, images, atol=1e-5)


def test_resized_crop_zooms_into_a_box_of_the_sampled_area_and_ratio():
    # Channel 0 rises along the width, channel 1 along the height: box sides show as slopes.
    size = 6
    steps = np.arange(size, dtype=np.float32) / size
    ramps = np.zeros((8, size, size, 3), np.float32)
    ramps[..., 0] = steps[None, None, :]
    ramps[..., 1] = steps[None, :, None]
    # A quarter of the area, twice as wide as high: sides sqrt(2) / 2 and 1 / (2 sqrt(2)).
    out = np.asarray(resized_crop(ramps, KEY, scale=(0.25, 0.25), ratio=(2.0, 2.0)))
    np.testing.assert_allclose(out[..., 0] - out[:, :1, :, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 1] - out[:, :, :1, 1], 0.0, atol=1e-6)
    # Interior pixels interpolate exactly: the ramp's step times box side over image side.
    np.testing.assert_allclose(np.diff(out[:, 0, 1:-1, 0]), 2**0.5 / 2 / size, atol=1e-5)
    np.testing.assert_allclose(np.diff(out[:, 1:-1, 0, 1]), 2**-0.5 / 2 / size, atol=1e-5)
    assert len(np.unique(out[:, 0, 1, 0].round(5))) > 1  # boxes at different positions


def test_color_jitter_with_zero_strengths_is_the_identity():
    images = _images()
    out = augment.color_jitter(images, KEY, brightness=0.0, contrast=0.0, saturation=0.0)
    np.testing.assert_array_equal(out, images)


def _assert_blends(out, images, towards, strength):
    """out == towards + f * (images - towards), one f in [1 - strength, 1 + strength] per image."""
    d_in = (images - towards).reshape(len(images), -1)
    d_out = (np.asarray(out) - towards).reshape(len(images), -1)
    f = (d_in * d_out).sum(1) / (d_in * d_in).sum(1)
    np.testing.assert_allclose(d_out, f[:, None] * d_in, atol=1e-5)
    assert np.all(np.abs(f - 1) <= strength) and np.ptp(f) > 0


def test_color_jitter_follows_torchvision():
    # Pixels in [0.4, 0.6], so that no factor in [0.5, 1.5] clips them.
    images = 0.4 + 0.2 * _images()
    grey = (images @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]  # ITU-R 601 luma
    off = dict(brightness=0.0, contrast=0.0, saturation=0.0)
    bright = augment.color_jitter(images, KEY, **{**off, "brightness": 0.5})
    _assert_blends(bright, images, 0.0, 0.5)
    contrast = augment.color_jitter(images, KEY, **{**off, "contrast": 0.5})
    _assert_blends(contrast, images, grey.mean((1, 2, 3), keepdims=True), 0.5)
    saturation = augment.color_jitter(images, KEY, **{**off, "saturation": 0.5})
    _assert_blends(saturation, images, grey, 0.5)
    # One channel: the image is its own greyscale, so saturation changes nothing.
    out = augment.color_jitter(images[..., :1], KEY, **{**off, "saturation": 0.5})
    np.testing.assert_allclose(out, images[..., :1], atol=1e-6)


def test_pca_lighting_adds_one_colour_per_image():
    eigvec = np.asarray(augment.IMAGENET_EIGVEC)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-3)  # orthonormal columns
    images = _images()
    np.testing.assert_array_equal(augment.pca_lighting(images, KEY, std=0.0), images)
    shift = np.asarray(augment.pca_lighting(images, KEY, std=0.1)) - images
    np.testing.assert_allclose(shift - shift[:, :1, :1], 0.0, atol=1e-6)  # the same at every pixel
    # The shift's coordinates in the eigenvector basis are alpha * eigval: alpha ~ N(0, 0.1).
    alpha = np.linalg.solve(eigvec, shift[:, 0, 0].T).T / augment.IMAGENET_EIGVAL
    assert np.all(np.abs(alpha) < 0.5) and np.all(np.ptp(alpha, axis=0) > 0)
    # With one nonzero eigenvalue every shift is along that eigenvector (a column of eigvec).
    shift = augment.pca_lighting(images, KEY, std=0.1, eigval=(1.0, 0.0, 0.0)) - images
    along = eigvec[:, 0] / np.linalg.norm(eigvec[:, 0])
    np.testing.assert_allclose(shift[:, 0, 0], np.outer(shift[:, 0, 0] @ along, along), atol=1e-5)


def test_pca_lighting_on_one_channel_is_an_error_unless_off():
    grey = _images(channels=1)
    np.testing.assert_array_equal(augment.pca_lighting(grey, KEY, std=0.0), grey)
    with pytest.raises(ValueError, match=r"RGB images \(3 channels\); got 1"):
        augment.pca_lighting(grey, KEY, std=0.1)


def _one_hot(labels, num_classes=10):
    return np.eye(num_classes, dtype=np.float32)[labels]


def test_random_erasing_fills_one_box_of_the_drawn_size_in_about_its_share_of_images():
    batch, height, width, channels = 256, 20, 10, 2
    images = np.full((batch, height, width, channels), 2.0, np.float32)  # noise is in [0, 1]
    area, aspect = (0.05, 0.3), (0.5, 2.0)
    erase = jax.jit(functools.partial(augment.random_erasing, area=area, aspect=aspect))
    out = np.asarray(erase(images, KEY, probability=0.5))
    erased = out != 2.0
    assert np.all((out[erased] >= 0) & (out[erased] <= 1))
    boxes = erased[..., 0]
    np.testing.assert_array_equal(erased, np.broadcast_to(boxes[..., None], erased.shape))
    is_erased = boxes.any(axis=(1, 2))
    assert 0.4 < is_erased.mean() < 0.6
    for box in boxes[is_erased]:
        rows, cols = box.any(1), box.any(0)
        np.testing.assert_array_equal(box, np.outer(rows, cols))  # one rectangle
        np.testing.assert_array_equal(np.diff(np.flatnonzero(rows)), 1)  # without gaps
        np.testing.assert_array_equal(np.diff(np.flatnonzero(cols)), 1)
        fraction = box.mean()
        # Side lengths are rounded to whole pixels and clipped to the image.
        assert area[0] / 2 <= fraction <= area[1] * 1.5
    areas = boxes[is_erased].mean(axis=(1, 2))
    assert areas.max() - areas.min() > (area[1] - area[0]) / 2  # the sizes spread over the range
    np.testing.assert_array_equal(erase(images, KEY, probability=0.0), images)


@pytest.mark.parametrize(
    "fields",
    [
        dict(random_erasing=1.5),
        dict(random_erasing=-0.1),
        dict(random_erasing=0.5, random_erasing_area=(0.4, 0.02)),
        dict(random_erasing=0.5, random_erasing_aspect=(0.0, 3.0)),
    ],
)
def test_random_erasing_settings_that_cannot_be_drawn_are_refused_by_name(fields):
    with pytest.raises(ValueError, match=r"config\.augment\.random_erasing") as error:
        augment.check_random_erasing(_config(**fields))
    assert repr(list(fields.values())[-1]) in str(error.value) and "Set e.g." in str(error.value)
    augment.check_random_erasing(_config(random_erasing=0.5))


def test_mix_with_a_known_lambda_is_the_blend_with_the_reversed_batch():
    images, targets = _images(batch=4), _one_hot([0, 1, 2, 3])
    out, mixed = mixing.mix(images, targets, 0.3)
    np.testing.assert_allclose(out, 0.3 * images + 0.7 * images[::-1], rtol=1e-6)
    np.testing.assert_allclose(mixed[0, [0, 3]], [0.3, 0.7], rtol=1e-6)
    np.testing.assert_allclose(mixed.sum(1), 1.0, rtol=1e-6)


def test_mixup_draws_one_lambda_per_batch():
    images, targets = _images(), _one_hot(np.arange(8))
    out, mixed = mixing.mixup(images, targets, KEY, 0.4)
    lam = float(mixed[0, 0])
    assert 0 < lam < 1
    np.testing.assert_allclose(np.diag(mixed), lam, rtol=1e-6)
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
    np.testing.assert_allclose(mixed.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mixer", [mixing.mixup, mixing.cutmix])
def test_mixing_with_alpha_zero_is_the_identity(mixer):
    images, targets = _images(), _one_hot(np.arange(8))
    out, mixed = mixer(images, targets, KEY, 0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(mixed, targets)


def test_cutmix_pastes_one_box_and_mixes_targets_by_its_area():
    batch, size = 8, 16
    # Image i is constant i + 1: where a pixel came from is its value.
    images = np.broadcast_to(np.arange(1, batch + 1, dtype=np.float32), (size, size, 1, batch)).T
    targets = _one_hot(np.arange(batch))
    fractions = []
    for seed in range(3):
        out, mixed = mixing.cutmix(images, targets, jax.random.PRNGKey(seed), 1.0)
        from_partner = np.asarray(out) == images[::-1]
        box = from_partner[0, :, :, 0]
        np.testing.assert_array_equal(from_partner, np.broadcast_to(box[..., None], images.shape))
        np.testing.assert_array_equal(box, np.outer(box.any(1), box.any(0)))  # a rectangle
        np.testing.assert_array_equal(from_partner | (np.asarray(out) == images), True)
        fraction = box.mean()
        np.testing.assert_allclose(mixed[np.arange(batch), batch - 1 - np.arange(batch)], fraction)
        np.testing.assert_allclose(mixed.sum(1), 1.0, rtol=1e-6)
        fractions.append(fraction)
    assert any(0 < f < 1 for f in fractions)


def test_mixup_or_cutmix_picks_each_of_the_two():
    # Image i is constant i + 1: cutmix keeps whole values, mixup blends them.
    images = np.broadcast_to(np.arange(1, 9, dtype=np.float32), (4, 4, 1, 8)).T
    targets = _one_hot(np.arange(8))
    mixer = functools.partial(mixing.mixup_or_cutmix, mixup_alpha=1.0, cutmix_alpha=1.0)
    kinds = set()
    for seed in range(6):
        out, mixed = mixer(images, targets, jax.random.PRNGKey(seed))
        np.testing.assert_allclose(mixed.sum(1), 1.0, rtol=1e-6)
        lam = float(mixed[0, 0])
        if np.allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5):
            kinds.add("mixup")
        elif np.all((np.asarray(out) == images) | (np.asarray(out) == images[::-1])):
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_augment_batch_with_everything_off_is_normalisation_and_one_hot():
    images = (_images(channels=3) * 255).astype(np.uint8)
    labels = np.arange(8, dtype=np.int32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    out, targets = augment.augment_batch(
        images, labels, KEY, _config(), mean=mean, std=std, num_classes=10
    )
    # Within an ulp of the host's NumPy normalisation, not bitwise: XLA turns division by a
    # constant into multiplication by its reciprocal.
    np.testing.assert_allclose(out, pipeline.normalize(images, mean, std), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(augment.eval_preprocess(images, mean=mean, std=std), out)
    assert targets.dtype == jnp.float32
    np.testing.assert_array_equal(targets, _one_hot(labels))


# Every image augmentation.
ALL_ON = dict(
    crop_padding=1,
    flip=True,
    resized_crop=True,
    resized_crop_scale=(0.3, 1.0),
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    pca_lighting=0.1,
    random_erasing=0.5,
)


def test_augment_batch_jits_on_a_batch_sharded_over_eight_devices():
    assert jax.device_count() == 8
    sharded = NamedSharding(Mesh(jax.devices(), ("data",)), PartitionSpec("data"))
    images = (_images(batch=16, size=8, channels=3) * 255).astype(np.uint8)
    labels = np.arange(16, dtype=np.int32) % 10
    step = jax.jit(
        functools.partial(
            augment.augment_batch,
            augment_config=_config(**ALL_ON, mixup_alpha=0.2, cutmix_alpha=1.0),
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            num_classes=10,
        )
    )
    images, labels = jax.device_put(images, sharded), jax.device_put(labels, sharded)
    out, targets = step(images, labels, KEY)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert not np.allclose(out, (np.asarray(images) / 255 - 0.5) / 0.25, atol=1e-3)
    # The labels come through every image augmentation unchanged: the targets are exactly each
    # row's one-hot mixed with its partner's (never the same label here), by one batch weight.
    one_hot = _one_hot(np.asarray(labels))
    lam = float(targets[0, labels[0]])
    assert targets.dtype == jnp.float32 and 0 < lam < 1
    np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[::-1], atol=1e-6)
    np.testing.assert_array_equal(step(images, labels, KEY)[0], out)
    assert not np.allclose(step(images, labels, OTHER_KEY)[0], out)
    assert step._cache_size() == 1


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_of_one_hot_targets_equals_that_of_int_labels(label_smoothing):
    logits = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
    from_labels = losses.cross_entropy(logits, labels, label_smoothing)
    from_targets = losses.cross_entropy(logits, jax.nn.one_hot(labels, 5), label_smoothing)
    np.testing.assert_allclose(from_targets, from_labels, rtol=1e-6)
    # Int labels still give -log p(label), smoothed towards the mean over classes.
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    own, mean = log_p[np.arange(6), labels], log_p.mean(1)
    np.testing.assert_allclose(
        from_labels, -(1 - label_smoothing) * own - label_smoothing * mean, rtol=1e-5
    )


def test_images_cropped_on_the_host_are_not_cropped_again_on_the_devices():
    config = ml_collections.ConfigDict(
        dict(
            augment=_config(resized_crop=True, flip=True),
            data=dict(mean=(0.5,), std=(0.25,)),
            model=dict(num_classes=10),
        )
    )
    images = (_images(channels=1) * 255).astype(np.uint8)
    labels = np.arange(8, dtype=np.int32)
    assert augment.crop_ranges(config.augment) == ((0.08, 1.0), (3 / 4, 4 / 3))
    on_host = augment.train_preprocess(config, crops_on_host=True)(images, labels, KEY)
    on_devices = augment.train_preprocess(config)(images, labels, KEY)
    config.augment.resized_crop = False
    assert augment.crop_ranges(config.augment) is None
    no_crop = augment.train_preprocess(config)(images, labels, KEY)
    np.testing.assert_array_equal(on_host[0], no_crop[0])  # Flipped and normalised only.
    assert not np.array_equal(on_devices[0], no_crop[0])
