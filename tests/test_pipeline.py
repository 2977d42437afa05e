"""Batches: the data order is a pure function of (seed, epoch); evaluation sees every example once."""

import functools
import operator

import ml_collections
import numpy as np
import pytest

from cnn_lab.data import augment, pipeline

DATA = ml_collections.ConfigDict(dict(mean=(0.5,), std=(0.25,), random_crop_padding=0))


def _split(n: int) -> pipeline.Split:
    images = (np.arange(n)[:, None, None, None] % 256 * np.ones((1, 2, 2, 1))).astype(np.uint8)
    return pipeline.Split(images, np.arange(n, dtype=np.int32))


def _labels(batches):
    return [b["label"].tolist() for b in batches]


def test_order_is_a_pure_function_of_seed_and_epoch():
    split = _split(100)
    a = _labels(pipeline.train_batches(split, DATA, 10, seed=3, epoch=2))
    assert a == _labels(pipeline.train_batches(split, DATA, 10, seed=3, epoch=2))
    assert a != _labels(pipeline.train_batches(split, DATA, 10, seed=3, epoch=1))
    assert a != _labels(pipeline.train_batches(split, DATA, 10, seed=4, epoch=2))
    assert sorted(functools.reduce(operator.iadd, a, [])) == list(
        range(100)
    )  # an epoch is a permutation


def test_resuming_mid_epoch_gives_the_remaining_batches():
    split = _split(100)
    full = _labels(pipeline.train_batches(split, DATA, 10, seed=0, epoch=5))
    assert (
        _labels(pipeline.train_batches(split, DATA, 10, seed=0, epoch=5, first_step=4)) == full[4:]
    )


def test_processes_split_each_global_batch():
    split = _split(64)
    whole = _labels(pipeline.train_batches(split, DATA, 16, seed=0, epoch=0))
    parts = [
        _labels(
            pipeline.train_batches(
                split, DATA, 16, seed=0, epoch=0, process_index=i, process_count=2
            )
        )
        for i in range(2)
    ]
    assert [p0 + p1 for p0, p1 in zip(*parts, strict=True)] == whole


@pytest.mark.parametrize("n,batch,processes", [(103, 16, 1), (103, 16, 2), (8, 16, 1), (64, 16, 2)])
def test_eval_sees_every_example_exactly_once(n, batch, processes):
    seen = []
    for p in range(processes):
        for b in pipeline.eval_batches(
            _split(n), DATA, batch, process_index=p, process_count=processes
        ):
            assert len(b["label"]) == batch // processes
            seen += b["label"][b["mask"]].tolist()
    assert sorted(seen) == list(range(n))


def test_normalize_uses_mean_and_std():
    images = np.array([[[[0]], [[255]]]], np.uint8)
    out = pipeline.normalize(images, (0.5,), (0.25,))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-2.0, 2.0])


def test_random_crop_at_offset_zero_is_the_padded_corner():
    images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) + 1
    out = augment.random_crop(images, 2, np.array([[0, 0], [2, 2]]))
    assert out.shape == images.shape
    np.testing.assert_array_equal(out[0, 2:, 2:], images[0, :2, :2])
    assert not out[0, :2].any()  # zero padding
    np.testing.assert_array_equal(out[1], images[1])  # offset == padding: the original


def test_augmented_batches_are_deterministic_and_keep_labels():
    data = ml_collections.ConfigDict(dict(mean=(0.0,), std=(1.0,), random_crop_padding=1))
    split = pipeline.Split(np.full((32, 4, 4, 1), 255, np.uint8), np.arange(32, dtype=np.int32))
    a = list(pipeline.train_batches(split, data, 8, seed=0, epoch=0))
    b = list(pipeline.train_batches(split, data, 8, seed=0, epoch=0))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert any((x["image"] == 0).any() for x in a)  # some crops moved the image
    assert sorted(np.concatenate([x["label"] for x in a]).tolist()) == list(range(32))
