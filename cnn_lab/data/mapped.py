"""A streamed training split decoded once into a file that is mapped, not loaded.

Streaming through tf.data reads, shuffles and decodes every example every epoch: with small
images that costs more than a small model's step (on 2 cores, tf.data reads and shuffles
Fashion-MNIST's encoded examples more slowly than LeNet-5 trains, before decoding any). Decoded
once into a uint8 file next to the TFDS files, each batch is a copy of its rows: the
operating system's page cache holds what memory allows and reads the rest from disk. The
batches are `pipeline.train_batches` of the file, the device mode's order.
"""

import contextlib
import os
import shutil
import socket
import urllib.parse
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from cnn_lab.data import loading, pipeline, streaming

_FORMAT = 1  # Bump when decoding or resizing changes, so old files are not read.


def train_split(
    name: str, split: str, *, data_dir: str | None, image_size: int, max_gb: float
) -> pipeline.Split | None:
    """TFDS `split` decoded at `image_size` (`streaming.resize_and_crop`) in a mapped file, or None.

    The file (images (N, image_size, image_size, C) uint8, labels (N,) int32) is written on
    first use under <TFDS dir>/cnn_lab_decoded/. None: it would exceed `max_gb` (0: never
    make one), or TFDS is mocked (tests), or the data dir is read-only.
    """
    builder = loading._prepared_builder(name, data_dir, None)
    split = loading.fit_split(builder, split)
    feature = builder.info.features[builder.info.supervised_keys[0]]
    examples = builder.info.splits[split].num_examples
    size = examples * image_size**2 * feature.shape[-1]
    if loading._tfds_is_mocked() or not examples or size > max_gb * 2**30:
        return None
    folder_name = f"{urllib.parse.quote(split, safe='')}-{image_size}-mapped-v{_FORMAT}"
    folder = Path(builder.data_dir) / loading.DECODED_DIR / folder_name
    with contextlib.suppress(OSError, ValueError):
        return _open(folder, examples)
    shutil.rmtree(folder, ignore_errors=True)  # Missing or damaged: made again.
    try:
        _write(builder, split, image_size, folder, examples)
    except OSError:  # A read-only data dir streams through tf.data instead.
        return None
    return _open(folder, examples)


def _open(folder: Path, examples: int) -> pipeline.Split:
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy")
    if not len(images) == len(labels) == examples:
        raise ValueError(f"{folder} holds {len(images)} images, not {examples}.")
    return pipeline.Split(images, labels)


def _write(
    builder: tfds.core.DatasetBuilder, split: str, image_size: int, folder: Path, examples: int
) -> None:
    """Decode `split` in order into `folder`; written aside and renamed: readers see all or nothing."""
    tf = streaming.tensorflow()
    channels = builder.info.features[builder.info.supervised_keys[0]].shape[-1]
    # Hosts sharing a file system each write their own copy aside.
    partial = folder.with_name(f"{folder.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    partial.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        partial / "images.npy", "w+", np.uint8, (examples, image_size, image_size, channels)
    )
    labels = np.empty(examples, np.int32)
    ds = streaming._encoded_examples(builder, split, files_seed=None)
    preprocess = streaming._preprocess(builder, image_size, resize_to=image_size)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(1024)
    start = 0
    for batch in tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE)):
        end = start + len(batch["label"])
        images[start:end], labels[start:end] = batch["image"], batch["label"]
        start = end
    images.flush()
    del images
    np.save(partial / "labels.npy", labels)
    try:
        partial.rename(folder)
    except OSError:  # Another process wrote the same file first: keep its copy.
        shutil.rmtree(partial, ignore_errors=True)
        if not folder.is_dir():
            raise
