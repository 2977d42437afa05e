"""Both input modes: the same examples per epoch, the automatic choice, a run in each mode."""

import collections

import jax
import numpy as np
import pytest

from cnn_lab.configs import lenet_digits
from cnn_lab.data import inputs
from cnn_lab.metric_writer import read_metrics
from cnn_lab.runtime import sharding
from cnn_lab.train import train_and_evaluate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir, mode):
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.data.input_mode = mode
    return config


def _examples(batches) -> collections.Counter:
    rows = collections.Counter()
    for batch in batches:
        images, labels = jax.device_get(batch["image"]), jax.device_get(batch["label"])
        rows.update(
            image.tobytes() + bytes([label]) for image, label in zip(images, labels, strict=True)
        )
    return rows


def test_both_modes_train_on_the_same_examples_each_epoch(data_dir):
    mesh = sharding.make_mesh()
    epochs = {}
    for mode in ("device", "streaming"):
        config = _config(data_dir, mode)  # train[:512]: 4 whole batches of 128, none dropped
        data = inputs.make_inputs(config.data, 128, mesh, seed=0)
        assert data.mode == mode and data.steps_per_epoch == 4
        epochs[mode] = [list(data.train_batches(epoch)) for epoch in (0, 1)]
    for mode, (first, second) in epochs.items():
        assert len(first) == 4 and first[0]["image"].dtype == np.uint8
        assert first[0]["image"].sharding == sharding.batch_sharded(mesh)
        assert _examples(first) == _examples(second), mode  # an epoch is a permutation
        order = [jax.device_get(b["label"]).tolist() for b in first]
        assert order != [jax.device_get(b["label"]).tolist() for b in second], mode
    assert _examples(epochs["device"][0]) == _examples(epochs["streaming"][0])


def test_eval_batches_agree_between_modes(data_dir):
    mesh = sharding.make_mesh()
    seen = {}
    for mode in ("device", "streaming"):
        data = inputs.make_inputs(_config(data_dir, mode).data, 128, mesh, seed=0)
        batches = list(data.eval_batches("test", 96))
        seen[mode] = [(b["image"][b["mask"]], b["label"][b["mask"]]) for b in batches]
        assert sum(len(labels) for _, labels in seen[mode]) == data.num_examples("test") == 256
    for (a_images, a_labels), (b_images, b_labels) in zip(*seen.values(), strict=True):
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_labels, b_labels)


def test_auto_mode_keeps_small_splits_on_the_devices_and_streams_large_ones(data_dir):
    config = _config(data_dir, "auto")
    assert inputs.choose_mode(config.data) == "device"
    config.data.device_memory_mb = 0
    assert inputs.choose_mode(config.data) == "streaming"
    config.data.input_mode = "disk"
    with pytest.raises(ValueError, match="input_mode='disk'"):
        inputs.choose_mode(config.data)


def test_a_streaming_run_trains_and_resumes(data_dir, tmp_path):
    config = _config(data_dir, "streaming")
    results = train_and_evaluate(config, tmp_path)
    assert results["test"]["count"] == 256
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "val"] == [4, 8]
    config.train.num_epochs = 3
    train_and_evaluate(config, tmp_path, allow_config_changes=("train.num_epochs",))
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "val"] == [4, 8, 12]
