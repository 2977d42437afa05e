"""Any split of a TFDS data set as in-memory NumPy arrays; never downloads, prepares offline sources."""

import contextlib
import difflib
import functools
import os
import re
import sys
import urllib.parse
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from cnn_lab.data.builders import FASHION_MNIST_FILE_NAMES, Digits, FashionMnistLocal

if not sys.stderr.isatty():  # TFDS's preparation bars would fill a redirected log with frames.
    tfds.disable_progress_bar()


@functools.cache
def _start_tensorflow() -> None:
    """Import TF (seconds; only when data is read or prepared) with the GPUs hidden from it.

    TF only reads data here. Hidden before it initialises devices, or it grabs most of
    their memory, which JAX needs; once TF has initialised them (RuntimeError) it is too
    late to change.
    """
    # TF's oneDNN graph rewrites speed up TF's own math, which cnn_lab never runs; off, TF
    # also skips the line announcing them that it prints before any log setting applies.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")


# Where the IDX files of Fashion-MNIST are looked for when no source_dir is given.
FASHION_MNIST_SOURCE_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian: dataset-fashion-mnist

# Our builders need no download; this also keeps TFDS from looking for a prepared copy on GCS.
_OFFLINE = tfds.download.DownloadConfig(try_download_gcs=False)


# Decoded (and resized) splits, kept under each prepared data set's TFDS directory.
DECODED_DIR = "cnn_lab_decoded"
_DECODED_FORMAT = 1  # Bump when decoding or resizing changes, so old copies are not read.


class DatasetNotPreparedError(FileNotFoundError):
    """The data set is not in the data dir and cannot be prepared without internet access."""


def load_split(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    source_dir: str | None = None,
    image_size: int | None = None,
    keep_decoded: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, C) uint8 and labels (N,) int32 of `split` (a TFDS split string, slicing allowed, e.g. "train[:90%]").

    Images are resized to `image_size` x `image_size` when given. With `keep_decoded`, the
    arrays are also written to <TFDS dir>/cnn_lab_decoded/, and later loads of the same split
    and size read them from there: restarts skip decoding, resizing and importing TF.
    """
    builder = _prepared_builder(name, data_dir, source_dir)
    split = fit_split(builder, split)
    decoded = None
    if keep_decoded and not _tfds_is_mocked():
        size = image_size or "native"
        file_name = f"{urllib.parse.quote(split, safe='')}-{size}-v{_DECODED_FORMAT}.npz"
        decoded = Path(builder.data_dir) / DECODED_DIR / file_name
        # A missing or damaged copy is made again below.
        damaged = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)
        with contextlib.suppress(*damaged), np.load(decoded) as arrays:
            return arrays["images"], arrays["labels"]
    images, labels = _read_split(builder, split)
    if image_size is not None:
        images = _resize(images, image_size)
    if decoded is not None:
        with contextlib.suppress(OSError):  # A read-only data dir just goes without a copy.
            decoded.parent.mkdir(exist_ok=True)
            partial = decoded.with_name(f"{decoded.name}.{os.getpid()}.tmp.npz")
            np.savez(partial, images=images, labels=labels)
            partial.replace(decoded)  # Readers see the whole file or none.
    return images, labels


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """images (N, H, W, C) uint8 -> (N, size, size, C) uint8, bilinear with antialiasing."""
    if images.shape[1:3] == (size, size):
        return images
    _start_tensorflow()
    import tensorflow as tf

    resized = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The whole split through TFDS and tf.data: images (N, H, W, C) uint8, labels (N,) int32."""
    _start_tensorflow()
    name = builder.name
    ds = builder.as_dataset(
        split=split, as_supervised=True, read_config=tfds.ReadConfig(try_autocache=False)
    )
    # One batch of the whole split, read in one go, so a short or corrupt shard raises here.
    # Like as_dataset(batch_size=-1) but sized by the split's cardinality (which TFDS asserts):
    # batch_size=-1 uses info's example count, 0 under tfds.testing.mock_data, and then makes TF
    # reserve sys.maxsize slots and abort. Autocaching would only hold a second copy meanwhile.
    images, labels = tfds.as_numpy(ds.batch(int(ds.cardinality())).get_single_element())
    if images.ndim == 3:  # Grayscale stored without a channel axis.
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{name}: expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}."
        )
    return images, labels.astype(np.int32)


def fit_split(builder: tfds.core.DatasetBuilder, split: str) -> str:
    """`split` with its example-count slice bounds capped at the split's size.

    "train[:512]" of a 416-example train split is "train[:416]", so small data sets take the
    same slices as large ones (e.g. in `:smoke` mode); other split strings pass unchanged.
    """
    match = re.fullmatch(r"(\w+)\[(-?\d*):(-?\d*)\]", split)
    if match is None:
        return split
    try:
        size = builder.info.splits[match[1]].num_examples
    except (KeyError, ValueError):  # Unknown split, or mocked data without split metadata.
        return split
    start, stop = (str(max(-size, min(size, int(b)))) if b else "" for b in match.groups()[1:])
    return f"{match[1]}[{start}:{stop}]"


def num_examples(
    name: str, split: str, *, data_dir: str | None = None, source_dir: str | None = None
) -> int | None:
    """Examples in `split` (slicing allowed) from the data set's metadata; None if it has none."""
    builder = _prepared_builder(name, data_dir, source_dir)
    try:
        return builder.info.splits[fit_split(builder, split)].num_examples
    except (KeyError, ValueError):  # tfds.testing.mock_data serves data without split metadata.
        return None


def num_classes(name: str, *, data_dir: str | None = None, source_dir: str | None = None) -> int:
    """Number of classes of the label (second supervised key) of data set `name`."""
    info = _prepared_builder(name, data_dir, source_dir).info
    return info.features[info.supervised_keys[1]].num_classes


def check_classes(data_config: ml_collections.ConfigDict, model_classes: int) -> None:
    """Raise ValueError unless the data set (or config.data.classes) has `model_classes` classes."""
    found = len(data_config.classes) or num_classes(
        data_config.name, data_dir=data_config.data_dir, source_dir=data_config.source_dir
    )
    if found != model_classes:
        kept = f" (config.data.classes={tuple(data_config.classes)})" if data_config.classes else ""
        raise ValueError(
            f"Data set {data_config.name!r} has {found} classes{kept} but config.model.num_classes="
            f"{model_classes}. Set --config.model.num_classes={found}."
        )


def _prepared_builder(
    name: str, data_dir: str | None, source_dir: str | None
) -> tfds.core.DatasetBuilder:
    """Builder of `name` with its data in `data_dir`, preparing it first if that can be done offline."""
    if name == Digits.name:
        builder = Digits(data_dir=data_dir)
        if not builder.is_prepared():
            _start_tensorflow()  # Before TFDS prepares anything, which imports TF.
            builder.download_and_prepare(download_config=_OFFLINE)
        return builder
    builder = _tfds_builder(name, data_dir)
    if _tfds_is_mocked() or builder.is_prepared():
        return builder
    if name == FashionMnistLocal.name and (idx_dir := _fashion_mnist_source(source_dir)):
        root = builder.data_dir_root
        _start_tensorflow()
        FashionMnistLocal(data_dir=root, source_dir=idx_dir).download_and_prepare(
            download_config=_OFFLINE
        )
        # Read back through TFDS's own builder, as later runs will.
        return _tfds_builder(name, root)
    raise DatasetNotPreparedError(_not_prepared_message(builder))


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        if name == "own_data":  # own_data.NAME: its copy is made by sources.resolve.
            raise ValueError(
                f"No decoded copy of own data in {data_dir}: it was deleted or moved. Train "
                "again with the same config (python -m cnn_lab.train ...): it decodes "
                "config.data.source_dir again and resumes the run."
            ) from None
        close = difflib.get_close_matches(name, tfds.list_builders(with_community_datasets=False))
        raise ValueError(
            f"Unknown data set {name!r}: it is neither 'digits' nor a TFDS data set"
            f"{f' (did you mean {close}?)' if close else ''}. TFDS names are listed by "
            "`python -c 'import tensorflow_datasets as tfds; print(tfds.list_builders())'` and at "
            "https://www.tensorflow.org/datasets/catalog/overview."
        ) from None


def _tfds_is_mocked() -> bool:
    # tfds.testing.mock_data points every builder at a data dir holding no data (at most metadata)
    # and patches as_dataset to serve random examples, so "not prepared" is expected there.
    return tfds.core.DatasetBuilder.as_dataset.__module__.startswith("tensorflow_datasets.testing")


def _fashion_mnist_source(source_dir: str | None) -> str | None:
    """The folder to prepare fashion_mnist from: `source_dir` if given, else a known one that exists."""
    if source_dir is not None:
        return source_dir
    return next((d for d in FASHION_MNIST_SOURCE_DIRS if os.path.isdir(d)), None)


def _not_prepared_message(builder: tfds.core.DatasetBuilder) -> str:
    name, root = builder.name, builder.data_dir_root
    message = (
        f"TFDS data set {name!r} is not prepared in data_dir {root} (looked for {builder.data_dir}) "
        "and downloads are off. With internet access, pass --config.data.download=True to have "
        "TFDS download and prepare it; or prepare it on a machine with internet access with "
        f"`tfds build {name} --data_dir=<dir>` and copy <dir>/{name} into {root}, or set "
        "config.data.data_dir to a data dir that already holds it."
    )
    if name == FashionMnistLocal.name:
        message += (
            " Fashion-MNIST can also be prepared offline from its four IDX files: "
            "`apt-get install dataset-fashion-mnist` (installs them in "
            f"{FASHION_MNIST_SOURCE_DIRS[0]}), or set config.data.source_dir to a folder holding "
            f"{', '.join(FASHION_MNIST_FILE_NAMES)}."
        )
    return message
