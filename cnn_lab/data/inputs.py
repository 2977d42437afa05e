"""A run's input, device-resident or streaming (config.data.input_mode), behind one interface.

- device: each split is decoded once into host memory (uint8, kept decoded next to the TFDS
  files); the training split is copied to the devices and each step's batch is gathered
  there, so only its indices cross from the host.
- streaming: the training split decoded once into a file the host maps (`mapped.py`, up to
  config.data.mapped_max_gb), each batch's rows copied from it; or, beyond that size or with
  random-resized crops taken on the host, TFDS + tf.data read, decode and resize every epoch,
  each host its own part of the split (`streaming.py`).

In both, a thread makes the next batches and sends them to the devices while a step runs.

Both yield uint8 images; augmentation and normalisation run on the devices, in the jitted
steps. In both the order is a function of (seed, epoch), so a resumed run is exact.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import jax
import ml_collections
from jax.sharding import Mesh

from cnn_lab.data import loading, mapped, pipeline, streaming

MODES = ("auto", "device", "streaming")


def split_string(data_config: ml_collections.ConfigDict, split: str) -> str:
    """The TFDS split string of "train", "val" or "test" in this config; others pass through."""
    named = {
        "train": data_config.train_split,
        "val": data_config.validation_split,
        "test": data_config.test_split,
    }
    return named.get(split, split)


def choose_mode(data_config: ml_collections.ConfigDict) -> str:
    """config.data.input_mode, with "auto" resolved: device when the training split fits."""
    mode = data_config.input_mode
    if mode not in MODES:
        raise ValueError(f"config.data.input_mode={mode!r}: use one of {', '.join(MODES)}.")
    if mode != "auto":
        return mode
    examples = loading.num_examples(
        data_config.name,
        data_config.train_split,
        data_dir=data_config.data_dir,
        source_dir=data_config.source_dir,
    )
    if examples is None:  # Size unknown (mocked data in tests): small, keep it on device.
        return "device"
    image_bytes = data_config.image_size**2 * data_config.channels
    return (
        "device" if examples * image_bytes <= data_config.device_memory_mb * 2**20 else "streaming"
    )


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Training batches (global, on the devices) and evaluation batches (this process's rows)."""

    mode: str
    data_config: ml_collections.ConfigDict
    batch_size: int
    mesh: Mesh
    steps_per_epoch: int
    seed: int
    in_memory: dict[str, pipeline.Split]  # device mode: "train", "val", "test"; else {}.
    mapped_train: pipeline.Split | None  # streaming: the training split in a mapped file.
    # Streaming: (area scale range, aspect ratio range) of random-resized crops taken on the
    # host from each whole decoded image; None: a fixed-size centre crop, augmented later.
    resized_crop: streaming.CropRanges | None = None

    @property
    def crops_on_host(self) -> bool:
        """Whether training images arrive random-resized-cropped (the devices must not crop again)."""
        return self.mode == "streaming" and self.resized_crop is not None

    @functools.cached_property
    def _train_on_devices(self) -> pipeline.DeviceSplit:
        return pipeline.DeviceSplit.put(self.in_memory["train"], self.mesh)

    def train_batches(self, epoch: int, first_step: int = 0) -> Iterator[pipeline.Batch]:
        """Global batches {"image": (B, H, W, C) uint8, "label": (B,)} of `epoch`, on the devices."""
        order = dict(
            seed=self.seed,
            epoch=epoch,
            first_step=first_step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        if self.mode == "device":
            split = self._train_on_devices
            groups = pipeline.device_batch_groups(split, self.batch_size, self.mesh, **order)
            return _ungrouped(streaming.in_background(groups))
        if self.mapped_train is not None:
            batches = pipeline.train_batches(self.mapped_train, self.batch_size, **order)
            return streaming.prefetch_to_device(batches, self.mesh)
        dc = self.data_config
        batches = streaming.train_batches(
            dc.name,
            dc.train_split,
            data_dir=dc.data_dir,
            image_size=dc.image_size,
            batch_size=self.batch_size,
            resized_crop=self.resized_crop,
            **order,
        )
        return streaming.prefetch_to_device(batches, self.mesh)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[pipeline.Batch]:
        """This process's rows of every example of "train" | "val" | "test" once, padded and masked."""
        return eval_batches(
            self.data_config,
            split_string(self.data_config, split),
            batch_size,
            in_memory=self.in_memory.get(split),
        )

    def num_examples(self, split: str) -> int | None:
        """Examples in "train" | "val" | "test" (None when unknown)."""
        if split in self.in_memory:
            return len(self.in_memory[split])
        dc = self.data_config
        return loading.num_examples(
            dc.name, split_string(dc, split), data_dir=dc.data_dir, source_dir=dc.source_dir
        )


def _ungrouped(groups: Iterator[list[pipeline.Batch]]) -> Iterator[pipeline.Batch]:
    """The batches of each group in turn; closing this closes `groups` (and stops its thread)."""
    with contextlib.closing(groups):
        for group in groups:
            yield from group


def eval_batches(
    data_config: ml_collections.ConfigDict,
    split: str,
    batch_size: int,
    *,
    in_memory: pipeline.Split | None = None,
) -> Iterator[pipeline.Batch]:
    """This process's rows of every example of TFDS `split` once, padded and masked, by input mode.

    Batches are {"image": (b, H, W, C) uint8, "label": (b,), "mask": (b,) bool}, b = batch_size
    / process count; device mode reads `in_memory` when given, else loads the split.
    """
    rows = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if choose_mode(data_config) == "device":
        split_data = in_memory if in_memory is not None else pipeline.load(data_config, split)
        return pipeline.eval_batches(split_data, batch_size, **rows)
    return streaming.eval_batches(
        data_config.name,
        split,
        data_dir=data_config.data_dir,
        image_size=data_config.image_size,
        batch_size=batch_size,
        crop_fraction=data_config.eval_crop_fraction,
        **rows,
    )


def make_inputs(
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    mesh: Mesh,
    *,
    seed: int,
    resized_crop: streaming.CropRanges | None = None,
) -> Inputs:
    """The input of a run; raises ValueError when an epoch holds not one training batch.

    `resized_crop` (scale, ratio): in streaming mode, random-resized crops are taken on the
    host from the whole decoded image (as ImageNet recipes do), not from a centre crop.
    """
    mode = choose_mode(data_config)
    in_memory, mapped_train = {}, None
    if mode == "device":
        in_memory = {
            "train": pipeline.load_train(data_config, seed),
            **{
                name: pipeline.load(data_config, split_string(data_config, name))
                for name in ("val", "test")
            },
        }
        examples = len(in_memory["train"])
        steps = pipeline.steps_per_epoch(examples, batch_size)
    else:
        mapped_train, examples, steps = _streamed_train(data_config, batch_size, resized_crop)
    if steps == 0:
        raise ValueError(
            f"The training split {data_config.train_split!r} has {examples} examples, fewer "
            f"than config.train.batch_size={batch_size}. Lower the batch size."
        )
    return Inputs(
        mode, data_config, batch_size, mesh, steps, seed, in_memory, mapped_train, resized_crop
    )


def _streamed_train(
    data_config: ml_collections.ConfigDict,
    batch_size: int,
    resized_crop: streaming.CropRanges | None,
) -> tuple[pipeline.Split | None, int | None, int]:
    """(The mapped training split or None: tf.data every epoch, its examples, steps per epoch)."""
    if data_config.classes or data_config.train_examples_per_class:
        raise ValueError(
            f"config.data.classes={tuple(data_config.classes)} and train_examples_per_class="
            f"{data_config.train_examples_per_class} select examples in host memory, but "
            f"this run streams {data_config.name!r}. Set --config.data.input_mode=device "
            "(and raise config.data.device_memory_mb if needed), or clear both."
        )
    # Host-side random-resized crops need each whole image, not a fixed-size decoded copy.
    if resized_crop is None and data_config.keep_decoded:
        mapped_train = mapped.train_split(
            data_config.name,
            data_config.train_split,
            data_dir=data_config.data_dir,
            image_size=data_config.image_size,
            max_gb=data_config.mapped_max_gb,
        )
        if mapped_train is not None:
            examples = len(mapped_train)
            return mapped_train, examples, pipeline.steps_per_epoch(examples, batch_size)
    steps = streaming.num_train_steps(
        data_config.name,
        data_config.train_split,
        data_dir=data_config.data_dir,
        batch_size=batch_size,
        process_count=jax.process_count(),
    )
    examples = loading.num_examples(
        data_config.name, data_config.train_split, data_dir=data_config.data_dir
    )
    return None, examples, steps
