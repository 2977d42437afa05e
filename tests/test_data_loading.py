"""TFDS loading: the offline digits and Fashion-MNIST builders, mocked data, and the errors."""

import gzip
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cnn_lab.data import loading
from cnn_lab.data.builders import FASHION_MNIST_FILES


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(digits_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        split: loading.load_split("digits", split, data_dir=digits_dir)
        for split in ("train", "test")
    }


def test_digits_shapes_and_sizes(digits):
    (x_train, y_train), (x_test, y_test) = digits["train"], digits["test"]
    assert len(x_train) + len(x_test) == 1797
    assert (len(y_train), len(y_test)) == (1347, 450)
    for x, y in digits.values():
        assert x.shape[1:] == (8, 8, 1) and x.dtype == np.uint8
        assert y.dtype == np.int32 and set(np.unique(y)) == set(range(10))
    assert x_train.max() == 255  # Scaled from 0..16.


def test_digits_is_sklearns_split_in_sklearns_shuffled_order(digits):
    raw = load_digits()
    train, test = train_test_split(
        np.arange(1797), test_size=0.25, stratify=raw.target, random_state=0
    )
    for split, indices in (("train", train), ("test", test)):
        images, labels = digits[split]
        expected = np.round(raw.images[indices] * 255 / 16).astype(np.uint8)[..., None]
        np.testing.assert_array_equal(images, expected)
        np.testing.assert_array_equal(labels, raw.target[indices])


def test_digits_splits_are_disjoint_and_cover_the_raw_data(digits):
    def rows(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
        return sorted(
            image.tobytes() + bytes([label]) for image, label in zip(images, labels, strict=True)
        )

    raw = load_digits()
    raw_images = np.round(raw.images * 255 / 16).astype(np.uint8)
    (x_train, y_train), (x_test, y_test) = digits["train"], digits["test"]
    both = rows(np.concatenate([x_train, x_test])[..., 0], np.concatenate([y_train, y_test]))
    assert both == rows(raw_images, raw.target)


def test_digits_test_split_is_stratified(digits):
    per_class_total = np.bincount(load_digits().target)
    per_class_test = np.bincount(digits["test"][1], minlength=10)
    assert np.all(np.abs(per_class_test - per_class_total * 0.25) <= 1)


def test_digits_preparation_is_deterministic(digits, tmp_path):
    for split, (images, labels) in digits.items():
        again = loading.load_split("digits", split, data_dir=str(tmp_path))
        np.testing.assert_array_equal(again[0], images)
        np.testing.assert_array_equal(again[1], labels)


def test_digits_validation_slices_partition_train(digits, digits_dir):
    head = loading.load_split("digits", "train[:90%]", data_dir=digits_dir)
    tail = loading.load_split("digits", "train[90%:]", data_dir=digits_dir)
    np.testing.assert_array_equal(np.concatenate([head[0], tail[0]]), digits["train"][0])
    np.testing.assert_array_equal(np.concatenate([head[1], tail[1]]), digits["train"][1])
    assert set(np.unique(tail[1])) == set(range(10))


def test_digits_num_classes(digits_dir):
    assert loading.num_classes("digits", data_dir=digits_dir) == 10


def _tfrecord_prefix(path: Path, num_records: int) -> bytes:
    """The first `num_records` whole records of a TFRecord file."""
    data, end = path.read_bytes(), 0
    for _ in range(num_records):
        (length,) = struct.unpack_from("<Q", data, end)
        end += 8 + 4 + length + 4  # Length, its CRC, payload, its CRC.
    return data[:end]


@pytest.mark.parametrize("damage", ["whole_records_missing", "cut_mid_record"])
def test_damaged_shard_raises(tmp_path, damage):
    loading.load_split("digits", "test", data_dir=str(tmp_path))  # Prepares a private copy.
    (shard,) = (tmp_path / "digits" / "1.0.0").glob("digits-train.tfrecord-*")
    prefix = _tfrecord_prefix(shard, 1000)
    shard.write_bytes(prefix if damage == "whole_records_missing" else prefix[:-100])
    with pytest.raises(tf.errors.OpError):
        loading.load_split("digits", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
    ],
)
def test_mock_data(tmp_path, name, shape, classes):
    with tfds.testing.mock_data(num_examples=7):
        images, labels = loading.load_split(name, "train[:90%]", data_dir=str(tmp_path))
        assert loading.num_classes(name, data_dir=str(tmp_path)) == classes
    assert images.shape == (7, *shape) and images.dtype == np.uint8
    assert labels.shape == (7,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < classes
    assert not any(tmp_path.iterdir())  # Mocked: nothing prepared, not even fashion_mnist.


def test_not_prepared_raises_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(loading.DatasetNotPreparedError) as error:
        loading.load_split("mnist", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    assert "'mnist'" in str(error.value) and str(tmp_path) in str(error.value)
    assert "tfds build mnist" in str(error.value)
    assert isinstance(error.value, FileNotFoundError)


def test_fashion_mnist_without_sources_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "FASHION_MNIST_SOURCE_DIRS", (str(tmp_path / "nowhere"),))
    with pytest.raises(loading.DatasetNotPreparedError, match="dataset-fashion-mnist") as error:
        loading.load_split("fashion_mnist", "train", data_dir=str(tmp_path))
    assert "source_dir" in str(error.value) and str(tmp_path) in str(error.value)


def test_unknown_name_suggests_names(tmp_path):
    with pytest.raises(ValueError, match=r"cifar_10.*cifar10.*list_builders"):
        loading.load_split("cifar_10", "train", data_dir=str(tmp_path))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">{1 + array.ndim}I", 0x800 + array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(
    source: Path, sizes: dict[str, int]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny IDX files in `source`; image i of each split has pixel (0, 0) = i, to match them up."""
    rng = np.random.default_rng(0)
    source.mkdir()
    written = {}
    for split, n in sizes.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images_file, labels_file = FASHION_MNIST_FILES[split]
        _write_idx(source / images_file, images)
        _write_idx(source / labels_file, labels)
        written[split] = images[..., None], labels.astype(np.int32)
    return written


def test_fashion_mnist_from_local_idx_files(tmp_path):
    written = _write_fashion_mnist(tmp_path / "idx", {"train": 20, "test": 10})
    data_dir = str(tmp_path / "tfds")
    for split, (expected_images, expected_labels) in written.items():
        images, labels = loading.load_split(
            "fashion_mnist", split, data_dir=data_dir, source_dir=str(tmp_path / "idx")
        )
        order = np.argsort(images[:, 0, 0, 0])  # TFDS stores examples in key-hash order.
        np.testing.assert_array_equal(images[order], expected_images)
        np.testing.assert_array_equal(labels[order], expected_labels)

    builder = tfds.builder("fashion_mnist", data_dir=data_dir)  # TFDS's own builder reads it.
    assert builder.is_prepared() and str(builder.version) == "3.0.1"
    assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
        "train": 20,
        "test": 10,
    }
    assert builder.info.features["label"].names[0] == "T-shirt/top"
    tfds_images, tfds_labels = tfds.as_numpy(
        builder.as_dataset(split="train", batch_size=-1, as_supervised=True)
    )
    # Once prepared the source files are not needed.
    images, labels = loading.load_split(
        "fashion_mnist", "train", data_dir=data_dir, source_dir="/nonexistent"
    )
    np.testing.assert_array_equal(images, tfds_images)
    np.testing.assert_array_equal(labels, tfds_labels)


def test_fashion_mnist_missing_idx_file_is_named(tmp_path):
    source = tmp_path / "idx"
    _write_fashion_mnist(source, {"train": 20, "test": 10})
    (source / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\.gz"):
        loading.load_split(
            "fashion_mnist", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(source)
        )
    assert not (tmp_path / "tfds" / "fashion_mnist" / "3.0.1").exists()


@pytest.mark.parametrize("damage", ["label_count", "truncated_images"])
def test_fashion_mnist_inconsistent_idx_file_is_named(tmp_path, damage):
    source = tmp_path / "idx"
    _write_fashion_mnist(source, {"train": 20, "test": 10})
    if damage == "label_count":
        _write_idx(source / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    else:
        path = source / "train-images-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-28]))
    with pytest.raises(ValueError, match="train-"):
        loading.load_split(
            "fashion_mnist", "train", data_dir=str(tmp_path / "tfds"), source_dir=str(source)
        )
    assert not (tmp_path / "tfds" / "fashion_mnist" / "3.0.1").exists()


def test_decoded_copy_is_kept_and_read_back_without_tfds(tmp_path, monkeypatch):
    first = loading.load_split("digits", "train[:100]", data_dir=str(tmp_path), image_size=32)
    kept = list((tmp_path / "digits" / "1.0.0" / loading.DECODED_DIR).glob("*.npz"))
    assert [p.name for p in kept] == ["train%5B%3A100%5D-32-v1.npz"]

    def no_tfds(*args):
        raise AssertionError("read through TFDS although a decoded copy is kept")

    monkeypatch.setattr(loading, "_read_split", no_tfds)
    again = loading.load_split("digits", "train[:100]", data_dir=str(tmp_path), image_size=32)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert again[0].shape == (100, 32, 32, 1)
    with pytest.raises(AssertionError, match="decoded copy"):  # another size is another copy
        loading.load_split("digits", "train[:100]", data_dir=str(tmp_path), image_size=28)


def test_damaged_decoded_copy_is_made_again(tmp_path):
    first = loading.load_split("digits", "test", data_dir=str(tmp_path))
    (kept,) = (tmp_path / "digits" / "1.0.0" / loading.DECODED_DIR).glob("*.npz")
    kept.write_bytes(kept.read_bytes()[:100])
    again = loading.load_split("digits", "test", data_dir=str(tmp_path))
    np.testing.assert_array_equal(again[0], first[0])
    assert kept.stat().st_size > 100  # rewritten whole


def test_keep_decoded_off_writes_nothing(tmp_path):
    loading.load_split("digits", "test", data_dir=str(tmp_path), keep_decoded=False)
    assert not (tmp_path / "digits" / "1.0.0" / loading.DECODED_DIR).exists()


def test_a_restart_reads_the_decoded_copy_without_importing_tensorflow(tmp_path):
    loading.load_split("digits", "test", data_dir=str(tmp_path), image_size=32)
    code = (
        "import sys; from cnn_lab.data import loading; "
        f"x, y = loading.load_split('digits', 'test', data_dir={str(tmp_path)!r}, image_size=32); "
        "assert x.shape == (450, 32, 32, 1), x.shape; "
        "assert 'tensorflow' not in sys.modules, 'TF imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
