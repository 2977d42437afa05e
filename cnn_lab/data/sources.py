"""The data a config names, made ready before a run starts: a user's own images decoded and the
config's unset fields taken from them; a TFDS data set downloaded when config.data.download
asks; and the class names every run keeps (classes.json in its workdir).
"""

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import tensorflow_datasets as tfds

from cnn_lab.data import image_files, loading, own_data
from cnn_lab.data.builders import FashionMnistLocal

CLASSES_FILE = "classes.json"  # In a run's workdir: its class names, label order.


def resolve(
    config: ml_collections.ConfigDict, fallback_dir: Path | None = None
) -> ml_collections.ConfigDict:
    """`config` with its data ready: a copy, with own data's unset fields filled from the data.

    For config.data.name == "own_data", the images at config.data.source_dir are checked
    (raising ValueError before anything is written), decoded once into a TFDS copy (beside
    them, or under `fallback_dir` when their folder is read-only), and these fields, when
    None, are taken from the data: data.channels, data.image_size, data.mean, data.std,
    model.num_classes; data.data_dir becomes the copy's. A set model.num_classes must agree
    with the data. Any other config given a source_dir (a zoo model's) trains on it the same
    way, its data set's statistics and class count replaced by the data's. Other data sets are downloaded and prepared by TFDS when
    config.data.download is True and they are not prepared yet.
    """
    if config.data.source_dir and config.data.name not in (own_data.NAME, FashionMnistLocal.name):
        config = _as_own_data(config)
    data = config.data
    if data.name != own_data.NAME:
        if data.get("download", False):
            _download(data.name, data.data_dir)
        return config
    if not data.source_dir:
        raise ValueError(
            "config.data.name='own_data' reads the images at config.data.source_dir, which is "
            "not set. Pass --config.data.source_dir=DIR (DIR/<class>/*.png) or =FILE.npz."
        )
    if data.channels not in (None, 1, 3):
        raise ValueError(
            f"config.data.channels={data.channels}: own data is read as grey (1) or RGB (3) "
            "images. Set 1 or 3, or leave it unset (None) to take it from the data."
        )
    path = Path(data.source_dir).expanduser()
    root = Path(data.data_dir) if data.data_dir else None
    if root is not None and own_data.read_prepared(root) is not None:
        root = root.parent  # A resolved config again (e.g. a saved run's): the same copies.
    root = root or (own_data.cache_root(path, fallback_dir) if path.exists() else None)
    source = image_files.open_source(path, skip_bad_files=data.skip_bad_files, scan_dir=root)
    known = len(data.classes) or len(source.class_names)
    names = f"{len(source.class_names)} classes {list(source.class_names)[:10]}"
    if config.model.num_classes is not None and config.model.num_classes != known:
        kept = f", of which config.data.classes keeps {known}" if data.classes else ""
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes}, but {data.source_dir} holds "
            f"{names}{kept}. Set --config.model.num_classes={known}, or leave it unset "
            "(None) to take it from the data."
        )
    channels = data.channels or (3 if source.colour else 1)
    (width, height), *others = sorted(source.sizes)
    shared_square = width if not others and width == height else None
    image_size = data.image_size or shared_square or data.default_image_size
    settings = own_data.Settings(
        channels=channels,
        image_size=image_size,
        val_fraction=data.val_fraction,
        test_fraction=data.test_fraction,
        split_seed=data.split_seed,
        skip_bad_files=data.skip_bad_files,
    )
    prepared = own_data.prepare(source, settings, own_data.copy_dir(source, settings, root))
    image_files.keep_scan(source, root)
    resolved = copy.deepcopy(config)
    resolved.data.channels = channels
    resolved.data.image_size = image_size
    resolved.data.data_dir = prepared.data_dir
    resolved.data.mean = tuple(data.mean or prepared.mean)
    resolved.data.std = tuple(data.std or prepared.std)
    resolved.model.num_classes = known
    return resolved


def _as_own_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config of a built-in data set pointed at a source_dir: the same model and recipe on the
    images there (its image size kept; statistics, channels and classes taken from them)."""
    converted = copy.deepcopy(config)
    data = converted.data
    print(
        f"config.data.source_dir={data.source_dir}: training on it instead of "
        f"{data.name!r}; its classes, channels, mean and std come from the data."
    )
    data.name = own_data.NAME
    data.train_split, data.validation_split, data.test_split = "train", "val", "test"
    data.channels = data.mean = data.std = converted.model.num_classes = None
    data.flip_preserves_label = False  # Unknown for the user's classes: no mirroring.
    return converted


def _download(name: str, data_dir: str | None) -> None:
    """Have TFDS download and prepare data set `name` unless it is prepared (or prepared offline)."""
    try:
        loading._prepared_builder(name, data_dir, None)
    except loading.DatasetNotPreparedError:
        loading._start_tensorflow()
        tfds.builder(name, data_dir=data_dir).download_and_prepare()


def class_names(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The names of the labels a run on `data_config` predicts, in label order.

    From the data set's label feature (TFDS names, own data's folder names), narrowed and
    reordered by config.data.classes when set; numbers when the data set names none.
    """
    info = loading._prepared_builder(
        data_config.name, data_config.data_dir, data_config.source_dir
    ).info
    label = info.features[info.supervised_keys[1]]
    names = tuple(label.names) if label.names else tuple(str(i) for i in range(label.num_classes))
    return tuple(names[c] for c in data_config.classes) if data_config.classes else names


def write_class_names(workdir: Path, data_config: ml_collections.ConfigDict) -> None:
    """Write the class names of a run on `data_config` to <workdir>/classes.json."""
    save_class_names(workdir, class_names(data_config))


def save_class_names(workdir: Path, names: Sequence[str]) -> None:
    """Write `names` (label order) to <workdir>/classes.json, a JSON list, atomically."""
    path = Path(workdir) / CLASSES_FILE
    partial = path.with_name(f"{CLASSES_FILE}.tmp")
    partial.write_text(json.dumps(list(names), indent=1) + "\n")
    partial.replace(path)


def read_class_names(workdir: Path, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """A run's class names: its classes.json, else (older runs) the label numbers."""
    path = Path(workdir) / CLASSES_FILE
    if path.is_file():
        return tuple(json.loads(path.read_text()))
    return tuple(str(c) for c in (config.data.classes or range(config.model.num_classes)))
