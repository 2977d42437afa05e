"""Predictions over a split: TTA views, MC dropout, sharded prediction, scores and ensembles."""

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_lab import predictors
from cnn_lab.data import augment, pipeline
from cnn_lab.models import get_model
from cnn_lab.runtime import sharding
from cnn_lab.tools import predict

TTA = dict(image_size=8, flip=False, crop_fraction=0.8, scales=(), mc_samples=4)


def build(image_size: int, channels: int = 1, **model_config) -> tuple[nn.Module, dict]:
    """A model from its config fields and variables filled from numpy (no `init` to compile).

    BatchNorm statistics are far from a batch's own, so train-mode BatchNorm would show.
    """
    model = get_model(ml_collections.ConfigDict(model_config))
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False), x)
    rng = np.random.default_rng(0)

    def fill(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        if path[-1].key == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


def images(n: int, size: int, channels: int = 1, seed: int = 0) -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(seed).normal(size=(n, size, size, channels)), jnp.float32
    )


@functools.cache
def jitted(model: nn.Module, variant: str, tta: tuple) -> Callable:
    """The jitted predict fn, compiled once per (model, variant, options) across the tests."""
    return jax.jit(predictors.make_predict_fn(model, variant, **{**TTA, **dict(tta)}))


@functools.cache
def logits_fn(model: nn.Module) -> Callable:
    return jax.jit(functools.partial(model.apply, train=False))


def run(model: nn.Module, variables: dict, x: jax.Array, variant: str, key=None, **tta):
    fn = jitted(model, variant, tuple(sorted(tta.items())))
    return np.asarray(fn(variables, x, jax.random.PRNGKey(0) if key is None else key))


def log_mean_softmax(logits: list[jax.Array]) -> np.ndarray:
    """The expected result, written out: log of the mean of softmax probabilities."""
    return np.log(np.mean([np.asarray(jax.nn.softmax(z, axis=-1)) for z in logits], axis=0))


@pytest.fixture(scope="module")
def resnet():
    """A CIFAR ResNet-8: global average pooling, BatchNorm, stochastic depth, no dropout."""
    return build(
        8,
        name="resnet",
        num_classes=10,
        depth=8,
        family="cifar",
        width=0.25,
        stochastic_depth_rate=0.5,
    )


@pytest.fixture(scope="module")
def lenet():
    """LeNet-5: a dense head, so it takes only 32x32 (or 28x28) input."""
    return build(32, name="lenet5", num_classes=10)


def convnet(dropout_rate: float) -> tuple[nn.Module, dict]:
    return build(8, name="convnet", num_classes=10, hidden_size=16, dropout_rate=dropout_rate)


@pytest.mark.parametrize("which", ["resnet", "lenet"])
def test_crops_of_a_constant_image_equal_plain(which, request):
    model, variables = request.getfixturevalue(which)
    size = 8 if which == "resnet" else 32
    constant = jnp.full((2, size, size, 1), 0.7, jnp.float32)
    real = images(2, size)
    for flip in (False, True):  # 5 and 10 views
        crops = functools.partial(
            run, model, variables, variant="crops", image_size=size, flip=flip, crop_fraction=0.875
        )
        assert crops(constant).shape == (2, 10) and crops(constant).dtype == np.float32
        np.testing.assert_allclose(
            crops(constant), run(model, variables, constant, "plain"), atol=1e-5
        )
        # A real image's crops differ from it, so the equality above is not vacuous.
        assert np.abs(crops(real) - run(model, variables, real, "plain")).max() > 1e-3


def test_crop_views_are_the_corners_and_centre_of_the_resized_batch():
    x = images(2, 8, 3)
    views = np.asarray(predictors.crop_views(x, 6, 0.75, flip=True))  # resized to 8 / 0.75 -> 8
    assert views.shape == (10, 2, 6, 6, 3)
    x = images(2, 7, 3)
    views = np.asarray(predictors.crop_views(x, 6, 0.6, flip=True))  # resized to 10
    resized = np.asarray(jax.image.resize(x, (2, 10, 10, 3), "bilinear"))
    corners = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    for v, (i, j) in enumerate(corners):
        crop = resized[:, i : i + 6, j : j + 6, :]
        np.testing.assert_allclose(views[v], crop, atol=1e-6)
        np.testing.assert_allclose(views[v + 5], crop[:, :, ::-1, :], atol=1e-6)
    assert len(predictors.crop_views(x, 6, 0.6, flip=False)) == 5


def test_padded_crop_views_are_the_training_shifts_at_the_corners_and_centre():
    """A run trained on pad-and-crop sees, as TTA crops, images its training could have drawn."""
    raw = np.random.default_rng(0).integers(0, 256, (2, 6, 6, 3), np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    normalised = augment.eval_preprocess(raw, mean=mean, std=std)
    fill = tuple(-m / s for m, s in zip(mean, std, strict=True))  # Training pads with black.
    views = np.asarray(predictors.crop_views(normalised, 6, 0.875, True, padding=2, fill=fill))
    assert views.shape == (10, 2, 6, 6, 3)
    for v, offset in enumerate([(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]):
        shifted = augment.crop_at(raw / 255.0, jnp.full((2, 2), jnp.asarray(offset)), 2)
        expected = (np.asarray(shifted) - mean) / std
        np.testing.assert_allclose(views[v], expected, atol=1e-5)
        np.testing.assert_allclose(views[v + 5], expected[:, :, ::-1], atol=1e-5)
    np.testing.assert_allclose(views[4], normalised, atol=1e-6)  # The centre is the image.


def test_flip_is_the_mean_probability_of_the_image_and_its_mirror(lenet):
    model, variables = lenet
    x = images(3, 32)
    expected = log_mean_softmax(
        [logits_fn(model)(variables, x), logits_fn(model)(variables, x[:, :, ::-1])]
    )
    flipped = run(model, variables, x, "flip")
    np.testing.assert_allclose(flipped, expected, atol=1e-5)
    symmetric = x + x[:, :, ::-1]
    np.testing.assert_allclose(
        run(model, variables, symmetric, "flip"),
        run(model, variables, symmetric, "plain"),
        atol=1e-5,
    )


def test_scales_average_the_plain_and_resized_views(resnet, lenet):
    model, variables = resnet
    x = images(2, 8)
    expected = log_mean_softmax(
        [
            logits_fn(model)(variables, jax.image.resize(x, (2, s, s, 1), "bilinear"))
            for s in (8, 6, 12)
        ]
    )
    np.testing.assert_allclose(
        run(model, variables, x, "scales", scales=(6, 12)), expected, atol=1e-5
    )
    assert predict.accepts_size(model, variables, 12, 1)
    assert predict.accepts_size(*lenet, 32, 1)
    assert not predict.accepts_size(*lenet, 40, 1)


def test_mc_dropout_samples_dropout_and_nothing_else(resnet):
    model, variables = convnet(0.5)
    x = images(4, 8)
    a = run(model, variables, x, "mc_dropout", key=jax.random.PRNGKey(1))
    b = run(model, variables, x, "mc_dropout", key=jax.random.PRNGKey(2))
    assert np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(
        a, run(model, variables, x, "mc_dropout", key=jax.random.PRNGKey(1))
    )
    assert predict.has_dropout(model, variables, (8, 8, 1))
    # Rate 0: every pass is the plain network.
    model, variables = convnet(0.0)
    np.testing.assert_allclose(
        run(model, variables, x, "mc_dropout"), run(model, variables, x, "plain"), atol=1e-5
    )
    # Stochastic depth stays off and BatchNorm keeps its running statistics.
    model, variables = resnet
    np.testing.assert_allclose(
        run(model, variables, x, "mc_dropout"), run(model, variables, x, "plain"), atol=1e-5
    )
    assert not predict.has_dropout(model, variables, (8, 8, 1))


def test_mc_dropout_keeps_batchnorm_in_inference_mode():
    model, variables = build(
        32,
        name="vgg",
        num_classes=10,
        depth=11,
        batch_norm=True,
        hidden_sizes=(16,),
        dropout_rate=0.0,
    )
    x = images(2, 32)
    np.testing.assert_allclose(
        run(model, variables, x, "mc_dropout", mc_samples=2),
        run(model, variables, x, "plain"),
        atol=1e-5,
    )
    assert not predict.has_dropout(model, variables, (32, 32, 1))  # rate 0 is no dropout


def test_has_dropout_is_false_without_dropout_layers(lenet):
    assert not predict.has_dropout(*lenet, (32, 32, 1))


def test_unknown_variant_names_the_known_ones(lenet):
    with pytest.raises(ValueError, match=r"'mirror'.*plain, flip, crops, scales, mc_dropout"):
        predictors.make_predict_fn(lenet[0], "mirror", **TTA)


def batches(split: pipeline.Split):
    return pipeline.eval_batches(split, 8, process_index=0, process_count=1)


def test_predict_covers_the_split_once_in_order():
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    model, variables = convnet(0.5)
    rng = np.random.default_rng(0)
    split = pipeline.Split(
        rng.integers(0, 256, (21, 8, 8, 1), dtype=np.uint8), rng.integers(0, 10, 21, dtype=np.int32)
    )
    data_config = ml_collections.ConfigDict(dict(mean=(0.5,), std=(0.25,)))
    key = jax.random.PRNGKey(3)

    fn = predictors.make_predict_fn(model, "flip", **TTA)
    log_probs, labels = predict.predict(fn, variables, batches(split), data_config, mesh, key)
    assert log_probs.shape == (21, 10) and log_probs.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, split.labels)
    whole = pipeline.normalize(split.images, data_config.mean, data_config.std)
    np.testing.assert_allclose(log_probs, jax.jit(fn)(variables, whole, key), atol=1e-5)

    # MC dropout: deterministic given the key; identical images in different batches get
    # different masks (the key is folded with the batch index).
    fn = predictors.make_predict_fn(model, "mc_dropout", **{**TTA, "mc_samples": 2})
    same = pipeline.Split(np.repeat(split.images[:1], 16, axis=0), np.zeros(16, np.int32))
    first, _ = predict.predict(fn, variables, batches(same), data_config, mesh, key)
    second, _ = predict.predict(fn, variables, batches(same), data_config, mesh, key)
    np.testing.assert_array_equal(first, second)
    assert np.abs(first[:8] - first[8:]).max() > 1e-3


def test_scores_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1])
    result = predict.scores(np.log(probs), labels, num_bins=10)
    assert result["count"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7)) / 3)
    # Bins of width 0.1: 0.9 -> (0.8, 0.9], right; 0.6 -> (0.5, 0.6], wrong; 0.7 -> (0.6, 0.7], right.
    expected_ece = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7)) / 3
    assert result["ece"] == pytest.approx(expected_ece)
    # Two examples sharing a bin: the gaps average within it before the absolute value.
    shared = predict.scores(
        np.log(np.array([[0.82, 0.18], [0.88, 0.12]])), np.array([0, 1]), num_bins=5
    )
    assert shared["ece"] == pytest.approx(abs(0.5 - 0.85))

    confident = np.log(np.array([[1.0 - 1e-7, 1e-7], [1e-7, 1.0 - 1e-7]]))
    perfect = predict.scores(confident, np.array([0, 1]))
    assert perfect["accuracy"] == 1.0
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["nll"] == pytest.approx(0.0, abs=1e-6)


def test_ensemble_and_disagreement_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    q = np.array([[0.2, 0.5, 0.3], [0.2, 0.2, 0.6]])
    np.testing.assert_allclose(predict.ensemble([np.log(p)]), np.log(p), rtol=1e-6)
    np.testing.assert_allclose(
        predict.ensemble([np.log(p), np.log(q)]), np.log((p + q) / 2), rtol=1e-6
    )
    # Stable far from 1: log-probabilities around -1000 would underflow exp().
    far = predict.ensemble([np.log(p) - 1000.0, np.log(q) - 1000.0])
    np.testing.assert_allclose(far, np.log((p + q) / 2) - 1000.0, rtol=1e-6)

    assert predict.disagreement([np.log(p)]) == 0.0
    assert predict.disagreement([np.log(p), np.log(p), np.log(p)]) == 0.0
    assert predict.disagreement([np.log(p), np.log(q)]) == pytest.approx(0.5)  # row 0 differs
    r = np.array([[0.1, 0.1, 0.8], [0.1, 0.8, 0.1]])  # differs from p and q on both rows
    assert predict.disagreement([p, q, r]) == pytest.approx((0.5 + 1.0 + 1.0) / 3)
