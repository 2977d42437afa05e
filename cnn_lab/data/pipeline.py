"""Splits in host or device memory and their batches: the order is a function of (seed, epoch).

Batches hold uint8 images: augmentation and normalisation happen on the devices, inside
the jitted steps (`augment.augment_batch`, `augment.eval_preprocess`).
"""

import dataclasses
import functools
import itertools
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_lab.data import loading
from cnn_lab.runtime import sharding

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
    keep, labels = select_classes(labels.astype(np.int32), tuple(data_config.classes))
    return Split(images[keep], labels)


def load_train(data_config: ml_collections.ConfigDict, seed: int) -> Split:
    """The training split: `load` of train_split, cut to train_examples_per_class per class."""
    split = load(data_config, data_config.train_split)
    keep = examples_per_class(split.labels, data_config.train_examples_per_class, seed)
    return Split(split.images[keep], split.labels[keep])


def select_classes(labels: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(indices (n,) of the examples whose label is in `classes`, their labels renumbered).

    Class `classes[i]` becomes label i; `classes=()` keeps every example and label.
    """
    if not classes:
        return np.arange(len(labels)), labels
    missing = sorted(set(classes) - set(np.unique(labels).tolist()))
    if missing or len(set(classes)) != len(classes):
        raise ValueError(
            f"config.data.classes={classes}: classes {missing} have no examples, or a class is "
            f"listed twice. Labels present: {sorted(np.unique(labels).tolist())}."
        )
    keep = np.flatnonzero(np.isin(labels, classes))
    renumber = np.zeros(max(max(classes), int(labels.max())) + 1, np.int32)
    renumber[list(classes)] = np.arange(len(classes))
    return keep, renumber[labels[keep]]


def examples_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices (n,) of `per_class` examples of each label, chosen from `seed`; 0: all.

    The choice depends only on (labels, per_class, seed): the same examples in every input
    mode and on every resume.
    """
    if not per_class:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, per_class])
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(
                f"config.data.train_examples_per_class={per_class}, but class {label} has only "
                f"{len(members)} training examples. Lower it to at most {len(members)}."
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


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


def train_indices(
    num_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    first_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """This process's rows (b,) of the example indices of each global batch of `epoch`."""
    order = epoch_order(num_examples, seed, epoch)
    rows = _process_rows(batch_size, process_index, process_count)
    for step in range(first_step, steps_per_epoch(num_examples, batch_size)):
        yield order[step * batch_size : (step + 1) * batch_size][rows]


def train_batches(split: Split, batch_size: int, **order) -> Iterator[Batch]:
    """Training batches gathered in host memory, in `train_indices(len(split), ...)` order.

    Yields {"image": (b, H, W, C) uint8, "label": (b,) int32}; augmentation and
    normalisation happen on the devices, in the train step.
    """
    for index in train_indices(len(split), batch_size, **order):
        yield {"image": split.images[index], "label": split.labels[index]}


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
    """A split held on the devices (replicated): images (N, H, W, C) uint8, labels (N,) int32."""

    images: jax.Array
    labels: jax.Array

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def put(cls, split: Split, mesh: Mesh) -> "DeviceSplit":
        """Copy `split` once onto every device of `mesh`."""
        replicated = sharding.replicated(mesh)
        return cls(
            jax.device_put(split.images, replicated), jax.device_put(split.labels, replicated)
        )


# Batches gathered per call: a call's dispatch, index copy and hand-over from the input
# thread cost a small model's step about a tenth of its speed; one call per 8 steps, noise.
GATHERED_PER_CALL = 8


@functools.cache
def _gather(mesh: Mesh):
    """Batches from the (k, B) indices of k batches, each split over the data axis."""

    def gather(images, labels, index):
        return [{"image": images[i], "label": labels[i]} for i in index]

    return jax.jit(gather, out_shardings=sharding.batch_sharded(mesh))


def device_batch_groups(
    split: DeviceSplit, batch_size: int, mesh: Mesh, **order
) -> Iterator[list[Batch]]:
    """Global batches gathered on the devices, `GATHERED_PER_CALL` per call and per list.

    Only the indices cross from the host. In order, the batches are those of `train_batches`
    of the same split (`train_indices`). The last call's indices are padded with its last row,
    so that every call has one shape.
    """
    gather = _gather(mesh)
    index_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.DATA_AXIS))
    indices = train_indices(len(split), batch_size, **order)
    while group := list(itertools.islice(indices, GATHERED_PER_CALL)):
        rows = np.stack(group + group[-1:] * (GATHERED_PER_CALL - len(group)))
        index = jax.make_array_from_process_local_data(index_sharding, rows)
        yield gather(split.images, split.labels, index)[: len(group)]


def eval_batches(
    split: Split,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Every example once, in order; the last batch is padded, and "mask" marks real rows.

    Yields {"image": (b, H, W, C) uint8, "label": (b,) int32, "mask": (b,) bool}.
    """
    rows = _process_rows(batch_size, process_index, process_count)
    for start in range(0, len(split), batch_size):
        index = np.arange(start, start + batch_size)[rows]
        mask = index < len(split)
        index = np.where(mask, index, 0)
        yield {"image": split.images[index], "label": split.labels[index], "mask": mask}
