"""In-memory splits and their batches: the data order is a pure function of (seed, epoch)."""

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np

from cnn_lab.data import augment, loading

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in host memory: images (N, H, W, C) uint8 at the model's size, labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def load(data_config: ml_collections.ConfigDict, split: str) -> Split:
    """The TFDS split string `split` of `data_config.name`, resized to `data_config.image_size`."""
    images, labels = loading.load_split(
        data_config.name,
        split,
        data_dir=data_config.data_dir,
        source_dir=data_config.source_dir,
        image_size=data_config.image_size,
        keep_decoded=data_config.keep_decoded,
    )
    if images.shape[-1] != data_config.channels:
        raise ValueError(
            f"Data set {data_config.name!r} has {images.shape[-1]} channel(s) but "
            f"config.data.channels={data_config.channels}. Set config.data.channels="
            f"{images.shape[-1]}."
        )
    return Split(images, labels.astype(np.int32))


def normalize(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Float32 images (..., C) from uint8 ones: scaled to [0, 1], minus `mean`, over `std`."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (images.astype(np.float32) / 255.0 - mean) / std


def _process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ValueError(
            f"Batch size {global_batch} does not split over {process_count} processes; "
            "make it a multiple of the number of processes."
        )
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of example indices that epoch `epoch` of run `seed` trains on."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full training batches in one epoch (the partial last batch is left out of training)."""
    return num_examples // batch_size


def train_batches(
    split: Split,
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    first_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """This process's rows of each global training batch of `epoch`, from step `first_step` on.

    Yields {"image": (b, H, W, C) float32, "label": (b,) int32}, b = batch_size / process_count.
    """
    order = epoch_order(len(split), seed, epoch)
    rows = _process_rows(batch_size, process_index, process_count)
    padding = data_config.random_crop_padding
    for step in range(first_step, steps_per_epoch(len(split), batch_size)):
        index = order[step * batch_size : (step + 1) * batch_size][rows]
        images = split.images[index]
        if padding:
            # Drawn for the whole global batch, so the result does not depend on process count.
            rng = np.random.default_rng([seed, epoch, step])
            images = augment.random_crop(
                images, padding, augment.crop_offsets(rng, batch_size, padding)[rows]
            )
        yield {
            "image": normalize(images, data_config.mean, data_config.std),
            "label": split.labels[index],
        }


def eval_batches(
    split: Split,
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Every example once, in order; the last batch is padded, and "mask" marks real rows.

    Yields {"image": (b, H, W, C) float32, "label": (b,) int32, "mask": (b,) bool}.
    """
    rows = _process_rows(batch_size, process_index, process_count)
    for start in range(0, len(split), batch_size):
        index = np.arange(start, start + batch_size)[rows]
        mask = index < len(split)
        index = np.where(mask, index, 0)
        yield {
            "image": normalize(split.images[index], data_config.mean, data_config.std),
            "label": split.labels[index],
            "mask": mask,
        }
