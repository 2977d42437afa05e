"""A user's own images written once as a TFDS data set (train, val, test), with their statistics.

The copy is keyed by the source's fingerprint (file names, sizes and modification times) and
by how it is stored (channels, size, split fractions): an edited folder is read again, an
unchanged one never is. Once prepared, the copy is read like any TFDS data set, by
`tfds.builder("own_data", data_dir=...)`, so both input modes and exact resume work unchanged.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cnn_lab.data import builders, image_files, loading

NAME = "own_data"  # config.data.name of the data at config.data.source_dir.
STATS_FILE = "cnn_lab_own_data.json"  # Beside the TFDS files: written last, marks a whole copy.
CACHE_SUFFIX = ".cnn_lab"  # DIR/.cnn_lab/ or .FILE.npz.cnn_lab/ beside a .npz file.
_CHUNK = 1024  # Images decoded at once, in parallel.
_FORMAT = 1  # Bump when decoding, resizing or splitting changes, so old copies are not read.


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a source is stored: what changes the decoded copy besides the files themselves."""

    channels: int
    image_size: int
    val_fraction: float
    test_fraction: float
    split_seed: int
    skip_bad_files: bool


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A decoded copy: its TFDS data_dir and what the data says about itself."""

    data_dir: str
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_examples: dict[str, int]


class OwnData(builders.QuietPreparation, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The examples of an `image_files.Source`, decoded, converted and resized as `settings` says."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # Nothing is downloaded (see builders.Digits).

    def __init__(self, *, source: image_files.Source, settings: Settings, **kwargs):
        self.source, self.settings = source, settings
        self.indices = split_indices(source, settings)
        self.pixel_sums = np.zeros((2, settings.channels))  # Sums of x and x^2 over train pixels.
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size, channels = self.settings.image_size, self.settings.channels
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images of {self.source.path}, decoded by cnn_lab.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, channels)),
                    "label": tfds.features.ClassLabel(names=list(self.source.class_names)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # Stored in key order: train is already in a seeded order.
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # The files are local.
        return {split: self._generate_examples(split) for split in image_files.SPLITS}

    def _generate_examples(self, split: str):
        examples = self.indices[split]
        # Decoded on every core, a chunk at a time: a large folder is never held in memory.
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            chunks = (examples[i : i + _CHUNK] for i in range(0, len(examples), _CHUNK))
            images = (im for chunk in chunks for im in pool.map(lambda e: self._image(*e), chunk))
            for position, ((origin, index), image) in enumerate(zip(examples, images, strict=True)):
                yield position, self._example(split, origin, index, image)

    def _example(self, split: str, origin: str, index: int, image: np.ndarray) -> dict:
        """The example stored for `image`; training images also add to the pixel sums."""
        if split == "train":
            pixels = image.reshape(-1, image.shape[-1]).astype(np.float64) / 255
            self.pixel_sums += [pixels.sum(0), (pixels**2).sum(0)]
        return {"image": image, "label": int(self.source.labels[origin][index])}

    def _image(self, origin: str, index: int) -> np.ndarray:
        """Example `index` of the source's split `origin`, as (size, size, channels) uint8."""
        channels, size = self.settings.channels, self.settings.image_size
        if self.source.arrays is not None:
            image = image_files.to_channels(self.source.arrays[origin][index], channels)
        else:
            file = self.source.files[origin][index]
            try:
                image = image_files.read_image(file, channels)
            except (OSError, ValueError, SyntaxError) as error:
                raise ValueError(
                    f"{file} cannot be decoded ({error}). Remove or replace it, or pass "
                    "--config.data.skip_bad_files=True."
                ) from None
        return _fit(image, size)


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> (size, size, C): shorter side resized to `size` (bilinear), centre crop."""
    if image.shape[:2] == (size, size):
        return image
    mode = "L" if image.shape[-1] == 1 else "RGB"
    fitted = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
    fitted = _crop_square(fitted).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(fitted).reshape(size, size, image.shape[-1])


def _crop_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def split_indices(source: image_files.Source, settings: Settings) -> dict[str, list]:
    """(source split, index) of each example of train, val and test; train in a seeded order.

    A split the source lacks is carved from its train split, stratified by class, with
    settings.val_fraction / test_fraction; raises ValueError when a split ends up empty.
    """
    labels = source.labels
    # Only a split the source lacks is carved from train.
    fractions = tuple(
        0.0 if len(labels[s]) else getattr(settings, f"{s}_fraction") for s in ("val", "test")
    )
    keep, *carved = image_files.stratified_split(labels["train"], fractions, settings.split_seed)
    order = np.random.default_rng(settings.split_seed).permutation(keep)
    indices = {"train": [("train", int(i)) for i in order]}
    for split, taken in zip(("val", "test"), carved, strict=True):
        own = [(split, i) for i in range(len(labels[split]))]
        indices[split] = own or [("train", int(i)) for i in taken]
        if not indices[split]:
            fraction = f"config.data.{split}_fraction"
            raise ValueError(
                f"{source.path} gives no {split} examples: it has no {split} split and "
                f"{fraction}={getattr(settings, f'{split}_fraction')} takes none of "
                f"{len(labels['train'])} images. Raise {fraction} (e.g. 0.1) or add {split} images."
            )
    return indices


def cache_root(source_path: Path, fallback_dir: Path | None) -> Path:
    """Where the decoded copies of `source_path` go: beside it, else (read-only) `fallback_dir`."""
    source_path = Path(source_path)
    if source_path.is_dir():
        beside, parent = source_path / CACHE_SUFFIX, source_path
    else:
        beside, parent = (
            source_path.with_name(f".{source_path.name}{CACHE_SUFFIX}"),
            source_path.parent,
        )
    if (beside.is_dir() and os.access(beside, os.W_OK)) or os.access(parent, os.W_OK):
        return beside
    if fallback_dir is None:
        raise ValueError(
            f"{parent} is read-only, so the decoded copy of {source_path} cannot be kept beside "
            "it. Set --config.data.data_dir to a writable folder for it."
        )
    return Path(fallback_dir)


def copy_dir(source: image_files.Source, settings: Settings, root: Path) -> Path:
    """The TFDS data_dir of the copy of `source` stored as `settings`, under `root`."""
    key = json.dumps([_FORMAT, str(source.path.resolve()), dataclasses.asdict(settings)])
    settings_key = hashlib.sha256(key.encode()).hexdigest()
    return root / f"{source.fingerprint[:16]}-{settings_key[:12]}"


def read_prepared(data_dir: Path) -> Prepared | None:
    """The copy in `data_dir` if it was prepared whole; None if not (or damaged)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = json.loads((data_dir / STATS_FILE).read_text())
        return Prepared(
            str(data_dir),
            tuple(record["class_names"]),
            tuple(record["mean"]),
            tuple(record["std"]),
            dict(record["num_examples"]),
        )
    return None


def prepare(source: image_files.Source, settings: Settings, data_dir: Path) -> Prepared:
    """Decode `source` into a TFDS data set in `data_dir` (once) and return what it holds.

    A failure leaves nothing behind: a partial copy is removed before the error is raised.
    """
    data_dir = Path(data_dir)
    if (prepared := read_prepared(data_dir)) is not None:
        return prepared
    # Written beside, then renamed: a copy is whole or absent, even when two runs prepare it.
    partial = data_dir.with_name(f"{data_dir.name}.{os.getpid()}.tmp")
    topmost = next((p for p in reversed(data_dir.parents) if not p.exists()), None)
    try:
        loading._start_tensorflow()  # Before TFDS writes anything, which imports TF.
        builder = OwnData(source=source, settings=settings, data_dir=str(partial))
        builder.download_and_prepare(download_config=loading._OFFLINE)
        count = len(builder.indices["train"]) * settings.image_size**2
        mean = builder.pixel_sums[0] / count
        std = np.sqrt(np.maximum(builder.pixel_sums[1] / count - mean**2, 0)) + 1e-6
        record = {
            "class_names": list(source.class_names),
            "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(s), 6) for s in std],
            "num_examples": {s: len(builder.indices[s]) for s in image_files.SPLITS},
            "source": str(source.path),
        }
        (partial / STATS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        with contextlib.suppress(OSError):  # Another run renamed its copy first: keep that one.
            partial.rename(data_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if topmost is not None and read_prepared(data_dir) is None:
            shutil.rmtree(topmost, ignore_errors=True)  # A failure leaves no new folders.
    return read_prepared(data_dir)
