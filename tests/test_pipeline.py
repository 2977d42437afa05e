"""Batches: the data order is a pure function of (seed, epoch); evaluation sees every example once."""

import functools
import operator

import jax
import numpy as np
import pytest

from cnn_lab.data import pipeline
from cnn_lab.runtime import sharding


def _split(n: int) -> pipeline.Split:
    images = (np.arange(n)[:, None, None, None] % 256 * np.ones((1, 2, 2, 1))).astype(np.uint8)
    return pipeline.Split(images, np.arange(n, dtype=np.int32))


def _labels(batches):
    return [b["label"].tolist() for b in batches]


def test_order_is_a_pure_function_of_seed_and_epoch():
    split = _split(100)
    a = _labels(pipeline.train_batches(split, 10, seed=3, epoch=2))
    assert a == _labels(pipeline.train_batches(split, 10, seed=3, epoch=2))
    assert a != _labels(pipeline.train_batches(split, 10, seed=3, epoch=1))
    assert a != _labels(pipeline.train_batches(split, 10, seed=4, epoch=2))
    assert sorted(functools.reduce(operator.iadd, a, [])) == list(
        range(100)
    )  # an epoch is a permutation


def test_resuming_mid_epoch_gives_the_remaining_batches():
    split = _split(100)
    full = _labels(pipeline.train_batches(split, 10, seed=0, epoch=5))
    assert _labels(pipeline.train_batches(split, 10, seed=0, epoch=5, first_step=4)) == full[4:]


def test_processes_split_each_global_batch():
    split = _split(64)
    whole = _labels(pipeline.train_batches(split, 16, seed=0, epoch=0))
    parts = [
        _labels(
            pipeline.train_batches(split, 16, seed=0, epoch=0, process_index=i, process_count=2)
        )
        for i in range(2)
    ]
    assert [p0 + p1 for p0, p1 in zip(*parts, strict=True)] == whole


@pytest.mark.parametrize("n,batch,processes", [(103, 16, 1), (103, 16, 2), (8, 16, 1), (64, 16, 2)])
def test_eval_sees_every_example_exactly_once(n, batch, processes):
    seen = []
    for p in range(processes):
        for b in pipeline.eval_batches(_split(n), batch, process_index=p, process_count=processes):
            assert len(b["label"]) == batch // processes
            seen += b["label"][b["mask"]].tolist()
    assert sorted(seen) == list(range(n))


def test_normalize_uses_mean_and_std():
    images = np.array([[[[0]], [[255]]]], np.uint8)
    out = pipeline.normalize(images, (0.5,), (0.25,))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-2.0, 2.0])


@pytest.mark.parametrize(
    "examples, first_step, batches",
    [(100, 2, 4), (300, 0, 18)],  # Less than one gathering call; three, the last one short.
)
def test_device_batches_match_host_batches_on_eight_devices(examples, first_step, batches):
    """The device-resident mode gathers the same examples, in the same order, as the host."""
    split = _split(examples)
    mesh = sharding.make_mesh()
    on_devices = pipeline.DeviceSplit.put(split, mesh)
    order = dict(seed=1, epoch=3, first_step=first_step)
    host = list(pipeline.train_batches(split, 16, **order))
    groups = list(pipeline.device_batch_groups(on_devices, 16, mesh, **order))
    assert [len(g) for g in groups[:-1]] == [pipeline.GATHERED_PER_CALL] * (len(groups) - 1)
    device = [batch for group in groups for batch in group]
    assert len(device) == len(host) == batches
    for h, d in zip(host, device, strict=True):
        assert d["image"].dtype == np.uint8 and d["image"].sharding == sharding.batch_sharded(mesh)
        np.testing.assert_array_equal(jax.device_get(d["image"]), h["image"])
        np.testing.assert_array_equal(jax.device_get(d["label"]), h["label"])
