"""TFDS builders that prepare data sets fully offline; unregistered, so importing them changes nothing."""

import gzip
import math
import os
import struct
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.image_classification import mnist

# scikit-learn's digits (UCI, CC BY 4.0) as uint8 arrays: images (1797, 8, 8) of ink counts
# 0..16, labels, and the orders of its train and test splits (see Digits._split_generators).
DIGITS_FILE = Path(__file__).parent / "digits.npz"

_DIGITS_CITATION = """\
@misc{alpaydin1998optdigits,
  author       = {Alpaydin, E. and Kaynak, C.},
  title        = {Optical Recognition of Handwritten Digits},
  year         = {1998},
  howpublished = {UCI Machine Learning Repository},
  url          = {https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits}
}
"""

# Split name -> (images file, labels file), as published by Zalando and shipped by Debian.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_FILE_NAMES = tuple(f for pair in FASHION_MNIST_FILES.values() for f in pair)


class QuietPreparation:
    """Logs TFDS's two preparation lines (shown with --verbosity) instead of printing them.

    TFDS prints them for every builder, to let a user cancel a download; these builders
    read local files only, and their lines would be the chatter of every first run.
    """

    def _log_download_bytes(self) -> None:
        logging.info("Preparing %s in %s.", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        logging.info("Prepared %s in %s.", self.name, self.data_dir)


class Digits(QuietPreparation, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's 1797 8x8 handwritten digits, split 75/25 (stratified) into train/test."""

    name = "digits"
    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded, so there are no checksums to look up. Looking for them means resolving
    # this module's path through importlib resources, which fails for some installs (cnn_lab as a
    # namespace package installed in editable mode) and needs the importlib_resources backport.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's copy of the test set of the UCI Optical Recognition of Handwritten "
                "Digits data: 1797 8x8 images whose pixels count the ink in 4x4 blocks of a 32x32 "
                "bitmap (0..16), here scaled to 0..255. Split 75/25 into train/test, stratified "
                "by class; train is stored in a fixed shuffled order, so any slice is class-mixed."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Store examples in key order (TFDS would otherwise order them by key hash).
            disable_shuffling=True,
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
            citation=_DIGITS_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # The data ships with cnn_lab (DIGITS_FILE).
        with np.load(DIGITS_FILE) as digits:
            images = np.round(digits["images"] * (255 / 16)).astype(np.uint8)[..., None]
            labels = digits["labels"]
            # Shuffled orders (scikit-learn's stratified 75/25 split, seed 0): stored in that
            # order, the tail training carves off as validation (train[90%:]) is class-mixed.
            train, test = digits["train_order"], digits["test_order"]
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for position, i in enumerate(indices):  # Keyed by position: the order they are stored in.
            yield position, {"image": images[i], "label": int(labels[i])}


class FashionMnistLocal(QuietPreparation, mnist.FashionMNIST, skip_registration=True):
    """TFDS's own `fashion_mnist` (name, version, features, splits, keys), from local IDX files.

    TFDS's builder would download and checksum the files; copies recompressed by Debian fail
    that check, so this one reads them from `source_dir` instead. The prepared data dir is
    then read by plain `tfds.builder("fashion_mnist", data_dir=...)`.
    """

    name = "fashion_mnist"
    VERSION = mnist.FashionMNIST.VERSION
    url_infos = None  # No download; see Digits.

    def __init__(self, *, source_dir: str | os.PathLike, **kwargs):
        self.source_dir = Path(source_dir)
        missing = [f for f in FASHION_MNIST_FILE_NAMES if not (self.source_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST IDX file(s) missing from {self.source_dir}: {', '.join(missing)}. "
                "The folder must hold all four original files: "
                f"{', '.join(FASHION_MNIST_FILE_NAMES)}."
            )
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # The files are local; see the class docstring.
        return {
            split: self._generate_examples(self.source_dir / images, self.source_dir / labels)
            for split, (images, labels) in FASHION_MNIST_FILES.items()
        }

    def _generate_examples(self, images_path: Path, labels_path: Path):
        images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(
                f"{images_path} holds images of shape {images.shape} and {labels_path} holds "
                f"{len(labels)} labels; expected (N, 28, 28) images and N labels."
            )
        # Keyed by index like TFDS's MNIST builder, so examples land in the same order on disk.
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": image[..., None], "label": int(label)}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array (shape from the header) in a gzipped IDX file, checked against its header."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot decompress ({e}).") from e
    header_size = 4 * (1 + ndim)  # Big-endian magic number, then one uint32 size per dimension.
    if len(data) >= header_size:
        magic, *dims = struct.unpack_from(f">{1 + ndim}I", data)
        if magic == 0x800 + ndim and len(data) == header_size + math.prod(dims):
            return np.frombuffer(data, np.uint8, offset=header_size).reshape(dims)
    raise ValueError(
        f"{path}: not a {ndim}-d IDX file of unsigned bytes (wrong magic number, or the data "
        "is not as long as the header says)."
    )
