"""Streamed batches: order a pure function of (seed, epoch), disjoint host parts, every eval example once."""

import collections
import functools
import itertools
import os
import subprocess
import sys
import time
import types
import zlib

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn_lab.data import loading, streaming
from cnn_lab.runtime import sharding

# Examples per shard of the mocked splits: 43 and 13 examples, neither divisible by 2 or 4.
SHARDS = {"train": [10, 11, 11, 11], "test": [7, 6]}
NAMES = ("cifar10", "imagenet2012", "mnist")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A data dir holding only the metadata (features, splits, shards) of NAMES."""
    root = tmp_path_factory.mktemp("tfds")
    for name in NAMES:
        builder = tfds.builder(name, data_dir=str(root))
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_dir,
            template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
            dataset_name=name,
            filetype_suffix="tfrecord",
        )
        infos = [
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=lengths,
                num_bytes=0,
                filename_template=template.replace(split=split),
            )
            for split, lengths in SHARDS.items()
        ]
        builder.info.set_splits(tfds.core.SplitDict(infos))
        os.makedirs(builder.data_dir)
        builder.info.write_to_directory(builder.data_dir)
    return str(root)


def _fake_example(features: tfds.features.FeaturesDict, filename: str, position: int) -> dict:
    """Example `position` of shard `filename`: random, but always the same for the same place."""
    rng = np.random.default_rng([zlib.crc32(os.path.basename(filename).encode()), position])
    example = {}
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image):  # ImageNet's sides vary: 20 to 59 pixels.
            shape = [side or rng.integers(20, 60) for side in feature.shape]
            example[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif isinstance(feature, tfds.features.ClassLabel):
            example[key] = rng.integers(feature.num_classes)
        else:  # The text id or file name.
            example[key] = f"{os.path.basename(filename)}:{position}"
    return example


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Mocks FileReaderBuilder._as_dataset: each shard and slice serves its own examples.

    tfds.testing.mock_data's own replacement serves the same examples for every split and
    slice, so two processes' parts of a split could not be told apart.
    """
    instructions = self.info.splits[split].file_instructions
    if shuffle_files:  # As TFDS does: the shards in an order drawn from the seed.
        order = np.random.default_rng(read_config.shuffle_seed).permutation(len(instructions))
        instructions = [instructions[i] for i in order]
    features = self.info.features

    def encoded_examples():
        for f in instructions:
            for position in range(f.skip, f.skip + f.take):
                yield features.encode_example(_fake_example(features, f.filename, position))

    specs = tf.nest.map_structure(
        lambda info: tf.TensorSpec(info.shape, info.tf_dtype), features.get_serialized_info()
    )
    ds = tf.data.Dataset.from_generator(encoded_examples, output_signature=specs)
    ds = ds.apply(tf.data.experimental.assert_cardinality(sum(f.take for f in instructions)))
    return ds.map(functools.partial(features.decode_example, decoders=decoders))


@pytest.fixture
def mocked(data_dir: str) -> str:
    with tfds.testing.mock_data(data_dir=data_dir, as_dataset_fn=_as_dataset):
        yield data_dir


def _train(data_dir: str, name: str = "cifar10", **kwargs) -> list[streaming.Batch]:
    args = dict(split="train", image_size=32, batch_size=4, seed=0, epoch=0) | kwargs
    return list(streaming.train_batches(name, data_dir=data_dir, **args))


def _eval(data_dir: str, name: str = "cifar10", **kwargs) -> list[streaming.Batch]:
    args = dict(split="test", image_size=32, batch_size=4) | kwargs
    return list(streaming.eval_batches(name, data_dir=data_dir, **args))


def _rows(batches: list[streaming.Batch]) -> list[tuple[bytes, int]]:
    """Every real row of `batches` as (image bytes, label), in order."""
    return [
        (image.tobytes(), int(label))
        for batch in batches
        for image, label, real in zip(
            batch["image"],
            batch["label"],
            batch.get("mask", np.ones(len(batch["label"]), bool)),
            strict=True,
        )
        if real
    ]


def _source(name: str, data_dir: str, split: str) -> list[tuple[bytes, int]]:
    """The stored (image bytes, label) of `split`, in order, read through TFDS."""
    ds = loading._prepared_builder(name, data_dir, None).as_dataset(split=split, as_supervised=True)
    return [(image.tobytes(), int(label)) for image, label in tfds.as_numpy(ds)]


def _assert_equal(a: list[streaming.Batch], b: list[streaming.Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_importing_does_not_import_tensorflow():
    code = "import sys, cnn_lab.data.streaming; assert 'tensorflow' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize(
    ("name", "image_size", "channels", "classes"),
    [
        ("cifar10", 32, 3, 10),
        ("cifar10", 24, 3, 10),  # Smaller than stored.
        ("imagenet2012", 32, 3, 1000),  # Sides 20 to 59: both up- and downsampled.
        ("mnist", 32, 1, 10),  # Grayscale stays one channel.
    ],
)
def test_train_batches_shapes_and_steps(mocked, name, image_size, channels, classes):
    batches = _train(mocked, name, image_size=image_size)
    assert (
        len(batches)
        == 43 // 4
        == streaming.num_train_steps(name, "train", data_dir=mocked, batch_size=4)
    )
    for batch in batches:
        assert batch.keys() == {"image", "label"}
        assert batch["image"].shape == (4, image_size, image_size, channels)
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
        assert batch["label"].shape == (4,)
        assert batch["label"].min() >= 0 and batch["label"].max() < classes
    assert len(set(_rows(batches))) == 40  # 40 distinct examples of 43.


def test_images_already_at_size_pass_unchanged(mocked):
    train = _rows(_train(mocked, "cifar10", image_size=32))
    assert set(train) < set(_source("cifar10", mocked, "train"))


def test_resize_and_crop():
    image = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    # Shorter side 40 -> 20, so 64 -> 32; then the centre 16 x 16.
    out = streaming.resize_and_crop(tf.constant(image), 16, 20).numpy()
    resized = tf.image.resize(image, (20, 32), method="bilinear", antialias=True).numpy()
    expected = np.clip(np.round(resized), 0, 255).astype(np.uint8)[2:18, 8:24]
    np.testing.assert_array_equal(out, expected)
    # Shorter side already at the size: only cropped, centred; square: unchanged.
    for side_image, expected in ((image, image[:, 12:52]), (image[:, :40], image[:, :40])):
        out = streaming.resize_and_crop(tf.constant(side_image), 40, 40).numpy()
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_order_is_a_pure_function_of_seed_and_epoch(mocked, name):
    args = dict(split="train[:36]", batch_size=6)  # 6 whole batches: every example each epoch.
    first = _train(mocked, name, seed=3, epoch=2, **args)
    _assert_equal(first, _train(mocked, name, seed=3, epoch=2, **args))
    rows = _rows(first)
    assert len(set(rows)) == 36
    assert rows != _rows(_eval(mocked, name, split="train[:36]"))  # Not the stored order.
    for other in (dict(seed=3, epoch=1), dict(seed=4, epoch=2)):
        other_rows = _rows(_train(mocked, name, **other, **args))
        assert other_rows != rows
        assert collections.Counter(other_rows) == collections.Counter(rows)


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_resuming_mid_epoch_gives_the_remaining_batches(mocked, name):
    full = _train(mocked, name, seed=1, epoch=4)
    _assert_equal(_train(mocked, name, seed=1, epoch=4, first_step=3), full[3:])


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_processes_read_disjoint_equal_parts(mocked, name):
    hosts = [_train(mocked, name, batch_size=6, process_index=p, process_count=2) for p in (0, 1)]
    steps = streaming.num_train_steps(name, "train", data_dir=mocked, batch_size=6, process_count=2)
    assert [len(batches) for batches in hosts] == [steps, steps] == [21 // 3] * 2
    assert all(b["image"].shape[0] == 3 for batches in hosts for b in batches)
    rows = [set(_rows(batches)) for batches in hosts]
    assert not rows[0] & rows[1]
    # With process_count=2 the 43 examples split into two parts of 21; each is read whole.
    assert len(rows[0]) == len(rows[1]) == 21
    # Of the whole split, preprocessed alike (eval with crop_fraction 1 resizes as training does).
    assert rows[0] | rows[1] < set(_rows(_eval(mocked, name, split="train")))


def test_batch_size_must_split_over_processes(mocked):
    with pytest.raises(ValueError, match=r"batch_size=5 .*process_count=2.*batch_size=4"):
        _train(mocked, batch_size=5, process_count=2)
    with pytest.raises(ValueError, match=r"batch_size=5 .*process_count=2"):
        _eval(mocked, batch_size=5, process_count=2)
    with pytest.raises(ValueError, match="crop_fraction"):
        _eval(mocked, crop_fraction=1.5)


@pytest.mark.parametrize(("name", "crop_fraction"), [("cifar10", 1.0), ("imagenet2012", 0.875)])
def test_eval_sees_every_example_once_on_any_process_count(mocked, name, crop_fraction):
    args = dict(batch_size=4, crop_fraction=crop_fraction)
    whole = _eval(mocked, name, **args)
    _assert_equal(whole, _eval(mocked, name, **args))
    assert len(whole) == 4  # 13 examples: 3 whole batches and one with a single real row.
    assert sum(int(b["mask"].sum()) for b in whole) == 13
    assert whole[-1]["mask"].tolist() == [True, False, False, False]
    assert not whole[-1]["image"][1:].any()
    for batch in whole:
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
    # The stored examples in their stored order (images compared where they pass unchanged).
    rows, source = _rows(whole), _source(name, mocked, "test")
    assert len(set(rows)) == 13
    assert [label for _, label in rows] == [label for _, label in source]
    if crop_fraction == 1.0:
        assert rows == source
    # Two processes: process p has rows [2p, 2p + 2) of each global batch (process 1's last
    # batch is padding only), and both step through the same number of batches.
    parts = [_eval(mocked, name, **args, process_index=p, process_count=2) for p in (0, 1)]
    joined = [
        {key: np.concatenate([p0[key], p1[key]]) for key in p0}
        for p0, p1 in zip(*parts, strict=True)
    ]
    _assert_equal(joined, whole)


def test_prefetch_to_device_gives_sharded_global_batches(mocked):
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    host = _eval(mocked, "cifar10", split="train", batch_size=8)
    pulled = []

    def counted():
        for batch in host:
            pulled.append(batch)
            yield batch

    on_device = streaming.prefetch_to_device(counted(), mesh, size=2)
    first = next(on_device)
    # The thread sends two more and holds a third until there is room: no further.
    _wait_for(lambda: len(pulled) == 4)
    time.sleep(0.2)
    assert len(pulled) == 4
    got = [first, *on_device]
    assert len(got) == len(host) == 6  # 43 examples, in batches of 8.
    for device_batch, host_batch in zip(got, host, strict=True):
        assert device_batch.keys() == host_batch.keys()
        for key, array in device_batch.items():
            assert isinstance(array, jax.Array)
            assert array.sharding.is_equivalent_to(sharding.batch_sharded(mesh), array.ndim)
            assert len(array.addressable_shards) == 8
            np.testing.assert_array_equal(np.asarray(array), host_batch[key])


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_in_background_keeps_order_raises_errors_and_stops_when_closed():
    assert list(streaming.in_background(iter(range(100)), size=3)) == list(range(100))

    def failing():
        yield 1
        raise OSError("shard 3 is truncated")

    items = streaming.in_background(failing())
    assert next(items) == 1
    with pytest.raises(OSError, match="shard 3 is truncated"):
        next(items)

    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield i

    items = streaming.in_background(endless(), size=2)
    assert next(items) == 0
    items.close()  # e.g. a run stops mid-epoch
    time.sleep(0.3)
    stopped_at = len(pulled)
    time.sleep(0.3)
    assert len(pulled) == stopped_at <= 4


# Producers left running at exit, each busy in JAX's C++ code: Python's halting them there
# aborted the process after its work was done.
_LEFT_RUNNING = """
import itertools
import jax, numpy as np
from cnn_lab.data import streaming

def busy():
    for i in itertools.count():
        for _ in range(200):
            jax.device_put(np.zeros(100_000, np.float32)).block_until_ready()
        yield i

producers = [streaming.in_background(busy(), size=8) for _ in range(4)]
print([next(items) for items in producers])
"""


def test_a_process_exits_cleanly_with_producers_still_running(tmp_path):
    script = tmp_path / "left_running.py"
    script.write_text(_LEFT_RUNNING)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[0, 0, 0, 0]"


def test_a_prepared_data_set_through_tfds_reader(tmp_path):
    """Without mocks: digits, prepared offline, read by TFDS itself (its files are not shuffled)."""
    data_dir = str(tmp_path)
    images, labels = loading.load_split("digits", "test", data_dir=data_dir, keep_decoded=False)
    stored = [(image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)]
    assert _rows(_eval(data_dir, "digits", image_size=8, batch_size=64)) == stored

    args = dict(split="test", image_size=8, batch_size=32, seed=0, epoch=0, process_count=2)
    hosts = [_train(data_dir, "digits", **args, process_index=p) for p in (0, 1)]
    _assert_equal(hosts[0], _train(data_dir, "digits", **args, process_index=0))
    steps = streaming.num_train_steps(
        "digits", "test", data_dir=data_dir, batch_size=32, process_count=2
    )
    assert [len(batches) for batches in hosts] == [steps, steps] == [225 // 16] * 2
    # Each example read at most once over both hosts (digits has duplicate images), shuffled.
    read = [collections.Counter(_rows(batches)) for batches in hosts]
    assert read[0] + read[1] <= collections.Counter(stored)
    assert _rows(hosts[0]) != stored[: steps * 16]


def test_not_prepared_raises_at_once(tmp_path):
    start = time.monotonic()
    common = dict(data_dir=str(tmp_path), image_size=32, batch_size=4)
    calls = [
        lambda: streaming.train_batches("cifar10", "train", **common, seed=0, epoch=0),
        lambda: streaming.eval_batches("cifar10", "test", **common),
        lambda: streaming.num_train_steps("cifar10", "train", data_dir=str(tmp_path), batch_size=4),
    ]
    for call in calls:
        with pytest.raises(loading.DatasetNotPreparedError, match=r"'cifar10'.*tfds build cifar10"):
            call()
    assert time.monotonic() - start < 10


def test_random_resized_crop_of_the_whole_box_is_the_resized_image():
    image = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    feature = tfds.features.Image(shape=(None, None, 3))
    info = types.SimpleNamespace(features={"image": feature}, supervised_keys=("image", "label"))
    builder = types.SimpleNamespace(info=info)  # All a crop reads of a builder.
    crop = streaming._random_resized_crop(builder, 16, scale=(1.0, 1.0), ratio=(1.6, 1.6))
    encoded = feature.encode_example(image)
    out = crop(tf.constant(encoded), tf.constant(7), tf.constant([1, 2], tf.int64))
    resized = tf.image.resize(image, (16, 16), method="bilinear", antialias=True).numpy()
    np.testing.assert_array_equal(out["image"].numpy(), np.clip(np.round(resized), 0, 255))
    assert out["label"].numpy() == 7


def test_host_resized_crops_are_seeded_resumable_and_keep_the_order(mocked):
    args = dict(name="imagenet2012", image_size=16, seed=2, epoch=1)
    crops = ((0.08, 1.0), (3 / 4, 4 / 3))
    cropped = _train(mocked, resized_crop=crops, **args)
    plain = _train(mocked, **args)
    assert cropped[0]["image"].shape == (4, 16, 16, 3) and cropped[0]["image"].dtype == np.uint8
    for c, p in zip(cropped, plain, strict=True):  # The same examples, in the same order.
        np.testing.assert_array_equal(c["label"], p["label"])
    _assert_equal(cropped, _train(mocked, resized_crop=crops, **args))
    _assert_equal(_train(mocked, resized_crop=crops, first_step=3, **args), cropped[3:])
    other_epoch = _train(mocked, resized_crop=crops, **{**args, "epoch": 2})
    assert not np.array_equal(other_epoch[0]["image"], cropped[0]["image"])
    assert not np.array_equal(cropped[0]["image"], plain[0]["image"])
