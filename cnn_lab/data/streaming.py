"""Batches streamed from a prepared TFDS data set through tf.data, for data sets too large for memory.

The host only decodes, resizes to a fixed size, batches and prefetches uint8 images;
augmentation is done later, on the devices. Like `pipeline`, the training order is a pure
function of (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

import atexit
import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

import jax
import numpy as np
import tensorflow_datasets as tfds

from cnn_lab.data import loading
from cnn_lab.runtime import sharding

if TYPE_CHECKING:
    import tensorflow as tf

Batch = dict[str, np.ndarray]
T = TypeVar("T")
# ((min, max) fraction of the image area, (min, max) aspect ratio width / height).
CropRanges = tuple[tuple[float, float], tuple[float, float]]

# Largest shuffle buffer, in examples: about 1 GB of encoded ImageNet images.
SHUFFLE_BUFFER = 10_000


def train_batches(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    batch_size: int,
    seed: int,
    epoch: int,
    first_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    resized_crop: CropRanges | None = None,
) -> Iterator[Batch]:
    """This process's rows of each global training batch of `epoch`, from step `first_step` on.

    Yields {"image": (b, image_size, image_size, C) uint8, "label": (b,) int32},
    b = batch_size / process_count. Each process reads its own part of `split`
    (tfds.even_splits): the parts are disjoint and equal, so every process takes the same
    number of steps, and up to process_count - 1 examples of the split are never read.
    The file order and the shuffle of examples are seeded by (seed, epoch) alone. Images
    already image_size x image_size pass unchanged; others have their shorter side resized
    to image_size (bilinear, antialiased), then the centre square is taken; with
    `resized_crop`, a random box of the whole image (Inception's scale augmentation, seeded
    by (seed, epoch, position in the epoch)) is resized to image_size instead. Errors (data
    set not prepared, batch size) are raised by this call, not by the first batch.
    """
    per_process = _per_process(batch_size, process_index, process_count)
    builder = loading._prepared_builder(name, data_dir, None)
    split = loading.fit_split(builder, split)
    part = tfds.even_splits(split, n=process_count, drop_remainder=True)[process_index]
    files_seed, examples_seed = np.random.default_rng([seed, epoch]).integers(2**31, size=2)
    tf = tensorflow()
    ds = _encoded_examples(builder, part, files_seed=int(files_seed))
    # Encoded images are shuffled and skipped, not decoded ones: 10,000 decoded ImageNet
    # images would take about 5 GB, and a resumed epoch would decode every image it skips.
    buffer = min(builder.info.splits[part].num_examples, SHUFFLE_BUFFER)
    ds = ds.shuffle(buffer, seed=int(examples_seed), reshuffle_each_iteration=False)
    ds = ds.skip(first_step * per_process)  # The same as skipping first_step whole batches.
    if resized_crop is None:
        preprocess = _preprocess(builder, image_size, resize_to=image_size)
    else:
        crop = _random_resized_crop(builder, image_size, *resized_crop)
        crop_seed = int(np.random.default_rng([seed, epoch, process_index]).integers(2**31))
        # Each example's crop is drawn from its position in the epoch: resume-exact.
        ds = ds.enumerate(start=first_step * per_process)

        def preprocess(position, example):
            return crop(*example, tf.stack([tf.constant(crop_seed, tf.int64), position]))

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.with_options(_deterministic())))


def num_train_steps(
    name: str, split: str, *, data_dir: str | None, batch_size: int, process_count: int = 1
) -> int:
    """Steps of one epoch of `train_batches` (any process), from the split's metadata; reads no data."""
    per_process = _per_process(batch_size, 0, process_count)
    builder = loading._prepared_builder(name, data_dir, None)
    split = loading.fit_split(builder, split)
    part = tfds.even_splits(split, n=process_count, drop_remainder=True)[0]
    return builder.info.splits[part].num_examples // per_process


def eval_batches(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    batch_size: int,
    crop_fraction: float = 1.0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Every example of `split` once, in a fixed order; the last global batch is padded, and "mask" marks real rows.

    Yields {"image": (b, image_size, image_size, C) uint8, "label": (b,) int32,
    "mask": (b,) bool}, b = batch_size / process_count: process p takes rows [p*b, (p+1)*b)
    of each global batch, as `pipeline.eval_batches` does, and padded rows are zeros. Every
    process reads the encoded records of the whole split (evaluation splits are small) but
    decodes only its own rows. Images have their shorter side resized to
    round(image_size / crop_fraction), then the centre image_size x image_size is taken;
    with crop_fraction 1, images already at that size pass unchanged.
    """
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction={crop_fraction} must be in (0, 1].")
    per_process = _per_process(batch_size, process_index, process_count)
    builder = loading._prepared_builder(name, data_dir, None)
    split = loading.fit_split(builder, split)
    tf = tensorflow()
    ds = _encoded_examples(builder, split, files_seed=None)
    ds = ds.map(lambda image, label: (image, label, True))
    # batch_size - 1 padding rows, then whole global batches only: the last real row's batch is
    # completed and no further batch is made.
    padding = (tf.constant(b""), tf.zeros([], ds.element_spec[1].dtype), False)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(batch_size - 1))
    ds = ds.batch(batch_size, drop_remainder=True)
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    ds = ds.map(lambda images, labels, masks: (images[rows], labels[rows], masks[rows])).unbatch()

    preprocess = _preprocess(builder, image_size, resize_to=round(image_size / crop_fraction))
    channels = builder.info.features[builder.info.supervised_keys[0]].shape[-1]

    def real_or_zeros(encoded: "tf.Tensor", label: "tf.Tensor", mask: "tf.Tensor") -> dict:
        # Padding rows hold no image to decode.
        example = tf.cond(
            mask,
            lambda: preprocess(encoded, label),
            lambda: {
                "image": tf.zeros((image_size, image_size, channels), tf.uint8),
                "label": tf.zeros([], tf.int32),
            },
        )
        return {**example, "mask": mask}

    ds = ds.map(real_or_zeros, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds.with_options(_deterministic())))


def prefetch_to_device(
    batches: Iterable[Batch], mesh: jax.sharding.Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Each host batch as a global batch sharded over the mesh's data axis, `size` more already sent.

    A thread reads and sends the next batches (`in_background`) while the devices compute on
    the one yielded.
    """
    return in_background((sharding.to_global(batch, mesh) for batch in batches), size)


def in_background(items: Iterable[T], size: int = 2) -> Iterator[T]:
    """`items` in order, a thread making up to `size` of them ahead of the consumer.

    CPU steps run when dispatched (`host.keep_freed_memory`), so a batch made in the calling
    thread would wait for each step to end; made in a thread, it overlaps the step. An error
    in the thread is raised by the consumer's next(); closing the iterator stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    producers = _PRODUCERS  # A generator closed at exit may outlive the module's globals.

    def put(entry: tuple) -> bool:
        """Queue `entry` unless the consumer stopped; whether it was queued."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(entry, timeout=0.1)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # Handed to the consumer, which raises it.
            put((None, error))

    def consume() -> Iterator[T]:
        thread = threading.Thread(target=produce, name="cnn_lab-input", daemon=True)
        producers[thread] = stop
        thread.start()
        try:
            while True:
                item, error = ready.get()
                if error is not None:
                    raise error
                if item is _END:
                    return
                yield item
        finally:
            stop.set()
            producers.pop(thread, None)

    return consume()


_END = object()
# Producer threads not yet stopped, with their stop events.
_PRODUCERS: dict[threading.Thread, threading.Event] = {}


@atexit.register
def _stop_producers() -> None:
    """Stop and join the producers left running (e.g. an iterator never closed) before exit.

    At exit Python halts daemon threads wherever they are; one halted inside JAX's or TF's
    C++ code aborts the process ("FATAL: exception not rethrown") after a successful run.
    """
    for thread, stop in list(_PRODUCERS.items()):
        stop.set()
        thread.join(timeout=60)


def _per_process(batch_size: int, process_index: int, process_count: int) -> int:
    """Rows of each global batch that one process reads."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} does not split over process_count={process_count} "
            f"processes. Use a multiple of {process_count}, e.g. batch_size="
            f"{max(process_count, batch_size // process_count * process_count)}."
        )
    return batch_size // process_count


def tensorflow() -> ModuleType:
    """The tensorflow module, imported (seconds) and set up for reading data only."""
    loading._start_tensorflow()
    import tensorflow as tf

    return tf


def _deterministic() -> "tf.data.Options":
    """tf.data options that keep every parallel step in order: the same batches on every run."""
    tf = tensorflow()
    options = tf.data.Options()
    options.deterministic = True
    return options


def _encoded_examples(
    builder: tfds.core.DatasetBuilder, split: str, *, files_seed: int | None
) -> "tf.data.Dataset":
    """(encoded image () string, label () int) pairs of `split`; files in an order seeded by `files_seed`, else unshuffled."""
    image_key = builder.info.supervised_keys[0]
    feature = builder.info.features[image_key]
    if not isinstance(feature, tfds.features.Image) or feature.np_dtype != np.uint8:
        raise ValueError(
            f"{builder.name}: streaming reads uint8 image features, but {image_key!r} is {feature}."
        )
    return builder.as_dataset(
        split=split,
        as_supervised=True,
        # TFDS refuses to shuffle the files of a data set stored in order (disable_shuffling,
        # e.g. digits); train_batches still shuffles its examples.
        shuffle_files=files_seed is not None and not builder.info.disable_shuffling,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=files_seed, try_autocache=False),
    )


def _preprocess(
    builder: tfds.core.DatasetBuilder, image_size: int, *, resize_to: int
) -> Callable[["tf.Tensor", "tf.Tensor"], dict]:
    """(encoded image, label) -> {"image": (image_size, image_size, C) uint8, "label": () int32}."""
    tf = tensorflow()
    feature = builder.info.features[builder.info.supervised_keys[0]]

    # Every image already at the size (e.g. CIFAR at 32): no resize, a third of the cost.
    unchanged = tuple(feature.shape[:2]) == (image_size, image_size) == (resize_to, resize_to)

    def preprocess(encoded: "tf.Tensor", label: "tf.Tensor") -> dict:
        image = feature.decode_example(encoded)
        if not unchanged:
            image = resize_and_crop(image, image_size, resize_to)
        return {"image": image, "label": tf.cast(label, tf.int32)}

    return preprocess


def _random_resized_crop(
    builder: tfds.core.DatasetBuilder,
    image_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> Callable[["tf.Tensor", "tf.Tensor", "tf.Tensor"], dict]:
    """(encoded image, label, seed (2,)) -> {"image": (image_size, image_size, C) uint8, "label"}.

    A box of area fraction in `scale` and aspect ratio (width / height) in `ratio` of the
    whole image (the whole image when 10 draws do not fit), resized bilinearly (antialiased).
    """
    tf = tensorflow()
    feature = builder.info.features[builder.info.supervised_keys[0]]

    def crop(encoded: "tf.Tensor", label: "tf.Tensor", seed: "tf.Tensor") -> dict:
        image = feature.decode_example(encoded)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=ratio,
            area_range=scale,
            max_attempts=10,
        )
        resized = _resized(tf.slice(image, begin, size), (image_size, image_size))
        channels = image.shape[-1]
        return {
            "image": tf.ensure_shape(resized, (image_size, image_size, channels)),
            "label": tf.cast(label, tf.int32),
        }

    return crop


def _resized(image: "tf.Tensor", shape) -> "tf.Tensor":
    """uint8 (H, W, C) -> uint8 (*shape, C), bilinear and antialiased, rounded."""
    tf = tensorflow()
    resized = tf.image.resize(image, shape, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def resize_and_crop(image: "tf.Tensor", size: int, resize_to: int) -> "tf.Tensor":
    """(H, W, C) uint8 -> (size, size, C) uint8: shorter side resized to `resize_to` (bilinear, antialiased), centre crop."""
    tf = tensorflow()
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = shape * (resize_to / tf.reduce_min(shape))
    # Rounding must not leave the shorter side below resize_to.
    new_shape = tf.maximum(tf.cast(tf.round(scaled), tf.int32), resize_to)
    # Bilinear resizing to the same size gives back the same values: such images pass unchanged.
    resized = _resized(image, new_shape)
    top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
    crop = resized[top : top + size, left : left + size]
    return tf.ensure_shape(crop, (size, size, image.shape[-1]))
