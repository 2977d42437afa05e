"""Both input modes: the same examples per epoch, the automatic choice, a run in each mode."""

import collections
from pathlib import Path

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


def _config(data_dir, mode, mapped_max_gb=64.0):
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = data_dir
    config.data.input_mode = mode
    config.data.mapped_max_gb = mapped_max_gb
    return config


def _examples(batches) -> collections.Counter:
    rows = collections.Counter()
    for batch in batches:
        images, labels = jax.device_get(batch["image"]), jax.device_get(batch["label"])
        rows.update(
            image.tobytes() + bytes([label]) for image, label in zip(images, labels, strict=True)
        )
    return rows


# Streaming reads a decoded file (mapped) unless it would exceed mapped_max_gb (0: tf.data).
INPUTS = {"device": ("device", 64.0), "mapped": ("streaming", 64.0), "tf.data": ("streaming", 0)}


def test_every_input_trains_on_the_same_examples_each_epoch(data_dir):
    mesh = sharding.make_mesh()
    epochs = {}
    for name, (mode, mapped_max_gb) in INPUTS.items():
        config = _config(data_dir, mode, mapped_max_gb)  # train[:512]: 4 batches of 128
        data = inputs.make_inputs(config.data, 128, mesh, seed=0)
        assert data.mode == mode and data.steps_per_epoch == 4
        assert (data.mapped_train is not None) == (name == "mapped")
        epochs[name] = [list(data.train_batches(epoch)) for epoch in (0, 1)]
    for name, (first, second) in epochs.items():
        assert len(first) == 4 and first[0]["image"].dtype == np.uint8
        assert first[0]["image"].sharding == sharding.batch_sharded(mesh)
        assert _examples(first) == _examples(second), name  # an epoch is a permutation
        order = [jax.device_get(b["label"]).tolist() for b in first]
        assert order != [jax.device_get(b["label"]).tolist() for b in second], name
    assert _examples(epochs["device"][0]) == _examples(epochs["tf.data"][0])
    # The mapped file is read in the device mode's order: the very same batches.
    for device, mapped in zip(epochs["device"][0], epochs["mapped"][0], strict=True):
        for key in ("image", "label"):
            np.testing.assert_array_equal(jax.device_get(device[key]), jax.device_get(mapped[key]))


def test_a_damaged_mapped_file_is_decoded_again(data_dir):
    config = _config(data_dir, "streaming")
    mesh = sharding.make_mesh()
    first = inputs.make_inputs(config.data, 128, mesh, seed=0).mapped_train
    images_file = Path(first.images.filename)
    expected = np.array(first.images)
    del first
    with images_file.open("r+b") as f:
        f.truncate(images_file.stat().st_size // 2)
    again = inputs.make_inputs(config.data, 128, mesh, seed=0).mapped_train
    np.testing.assert_array_equal(np.asarray(again.images), expected)


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
