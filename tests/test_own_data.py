"""Own data: folders of images and .npz files, decoded once into a TFDS copy, statistics and class
names taken from them, bad inputs refused before anything is written, exact resume."""

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import cnn_lab
from cnn_lab.configs import own_data as own_data_config
from cnn_lab.data import image_files, inputs, loading, own_data, sources
from cnn_lab.train import train_and_evaluate
from cnn_lab.workdir import read_metrics

ROOT = Path(own_data_config.__file__).parents[1]
FORMATS = [("L", "png"), ("RGB", "jpg"), ("RGBA", "png"), ("P", "gif"), ("L", "bmp")]


def make_folder(root: Path, classes=("cat", "dog", "eel"), per_class=20, size=(12, 12)) -> Path:
    """Class folders of images whose brightness tells the class, in every format and mode."""
    rng = np.random.default_rng(len(classes))
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random(size[::-1]) * 60 + c * 90).astype(np.uint8)
            mode, ext = FORMATS[i % len(FORMATS)]
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i:03d}.{ext}")
    return root


def make_npz(path: Path, n=60, classes=3, with_test=True, channels_axis=False) -> Path:
    """A Keras mnist.npz-like file: uint8 (N, H, W) images, int labels."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = (rng.random((n, 10, 10)) * 60 + labels[:, None, None] * 90).astype(np.uint8)
    if channels_axis:
        images = images[..., None]
    arrays = dict(x_train=images, y_train=labels)
    if with_test:
        arrays |= dict(x_test=images[:15], y_test=labels[:15])
    np.savez(path, **arrays)
    return path


def config_for(source, *arg, **fields):
    config = own_data_config.get_config(",".join(("mlp", *arg)))
    config.data.source_dir = str(source)
    config.model.hidden_sizes = (16,)
    config.train.batch_size = 8
    config.eval.batch_size = 8
    config.train.progress_bar = False
    for key, value in fields.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_a_folder_of_every_format_and_mode_is_decoded_with_folder_names_as_classes(tmp_path):
    config = sources.resolve(config_for(make_folder(tmp_path / "data")))
    assert config.model.num_classes == 3
    assert config.data.channels == 3  # Colour images among them.
    assert config.data.image_size == 12  # All share one square size.
    assert len(config.data.mean) == len(config.data.std) == 3
    assert sources.class_names(config.data) == ("cat", "dog", "eel")
    assert Path(config.data.data_dir).parent == tmp_path / "data" / own_data.CACHE_SUFFIX
    counts = {
        s: loading.num_examples("own_data", s, data_dir=config.data.data_dir)
        for s in ["train", "val", "test"]
    }
    assert counts == {"train": 48, "val": 6, "test": 6}  # 10% of each class, twice.
    images, labels = loading.load_split("own_data", "train", data_dir=config.data.data_dir)
    assert images.shape == (48, 12, 12, 3) and images.dtype == np.uint8
    np.testing.assert_allclose(config.data.mean, images.mean((0, 1, 2)) / 255, atol=1e-4)
    assert sorted(np.bincount(labels)) == [16, 16, 16]


def test_grey_folders_of_mixed_sizes_are_grey_at_the_default_size(tmp_path):
    for c, name in enumerate(("a", "b")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i, (mode, ext) in enumerate([("L", "png"), ("LA", "png"), ("L", "bmp"), ("1", "png")]):
            image = Image.new("L", (20 + i, 14), 60 * c + 10 * i).convert(mode)
            image.save(tmp_path / "data" / name / f"{i}.{ext}")
    config = sources.resolve(
        config_for(tmp_path / "data", data__val_fraction=0.25, data__test_fraction=0.25)
    )
    assert config.data.channels == 1
    assert config.data.image_size == config.data.default_image_size == 32
    images, _ = loading.load_split("own_data", "test", data_dir=config.data.data_dir)
    assert images.shape == (2, 32, 32, 1)


def test_train_and_test_folders_are_used_and_val_is_carved_from_train(tmp_path):
    make_folder(tmp_path / "data" / "train", per_class=10)
    make_folder(tmp_path / "data" / "test", per_class=3)
    config = sources.resolve(config_for(tmp_path / "data"))
    data_dir = config.data.data_dir
    assert loading.num_examples("own_data", "test", data_dir=data_dir) == 9
    assert loading.num_examples("own_data", "val", data_dir=data_dir) == 3
    assert loading.num_examples("own_data", "train", data_dir=data_dir) == 27


@pytest.mark.parametrize("channels_axis", [False, True])
def test_an_npz_in_keras_layout_is_read(tmp_path, channels_axis):
    path = make_npz(tmp_path / "mnist.npz", channels_axis=channels_axis)
    config = sources.resolve(config_for(path, data__channels=3))
    assert (config.data.channels, config.data.image_size, config.model.num_classes) == (3, 10, 3)
    images, labels = loading.load_split("own_data", "test", data_dir=config.data.data_dir)
    assert images.shape == (15, 10, 10, 3) and list(labels[:4]) == [0, 1, 2, 0]
    assert (tmp_path / ".mnist.npz.cnn_lab").is_dir()


def test_an_unchanged_source_is_not_read_again_and_an_edited_one_is(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    first = sources.resolve(config_for(tmp_path / "data"))

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(image_files, "read_image", no_decoding)
    monkeypatch.setattr(image_files, "_header", no_decoding)  # The headers' scan is kept too.
    assert sources.resolve(config_for(tmp_path / "data")).data.data_dir == first.data.data_dir
    assert sources.resolve(first).data.data_dir == first.data.data_dir  # Resolving is idempotent.
    monkeypatch.undo()
    Image.new("L", (12, 12), 7).save(tmp_path / "data" / "cat" / "new.png")
    edited = sources.resolve(config_for(tmp_path / "data"))
    assert edited.data.data_dir != first.data.data_dir
    assert loading.num_examples("own_data", "train", data_dir=edited.data.data_dir) == 49


def test_a_read_only_data_folder_keeps_its_copy_in_the_workdir(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "data", per_class=10)
    # Root ignores permission bits, so the folder is made read-only as os.access reports it.
    monkeypatch.setattr(own_data.os, "access", lambda path, mode: Path(path) != data)
    config = sources.resolve(config_for(data), fallback_dir=tmp_path / "w" / "data_cache")
    assert Path(config.data.data_dir).parent == tmp_path / "w" / "data_cache"
    assert not (data / own_data.CACHE_SUFFIX).exists()


def test_a_configured_class_count_that_disagrees_names_both(tmp_path):
    config = config_for(make_folder(tmp_path / "data"))
    config.model.num_classes = 10
    with pytest.raises(ValueError, match=r"num_classes=10.*3 classes \['cat', 'dog', 'eel'\]"):
        sources.resolve(config)
    config.model.num_classes, config.data.channels = 3, 4
    with pytest.raises(ValueError, match=r"channels=4: .* Set 1 or 3"):
        sources.resolve(config)


def _folder_without_images(root):
    make_folder(root)
    for path in (root / "dog").iterdir():
        path.unlink()
    (root / "dog" / "notes.txt").write_text("no images here")


def _folder_with_bad_files(root):
    make_folder(root)
    for i in range(7):
        (root / "cat" / f"bad{i}.png").write_bytes(b"not a png")


BAD_SOURCES = {
    "missing path": (lambda root: None, "does not exist"),
    "empty folder": (lambda root: root.mkdir(), "holds no class folders"),
    "a class without images": (_folder_without_images, r"dog holds no images"),
    "a single class": (lambda root: make_folder(root, classes=("only",)), "at least 2"),
    "non-image files": (
        _folder_with_bad_files,
        r"7 file\(s\).*bad0.png.*and 2 more.*skip_bad_files=True",
    ),
    "labels outside 0..K-1": (
        lambda root: np.savez(
            root,
            x_train=np.zeros((4, 5, 5), np.uint8),
            y_train=[0, 1, 2, 3],
            class_names=["a", "b"],
        ),
        r"labels \[2, 3\] outside 0..1",
    ),
    "shapes that disagree": (
        lambda root: np.savez(root, x_train=np.zeros((4, 5, 5), np.uint8), y_train=[0, 1, 0]),
        r"y_train is int64 \(3,\) for x_train of 4 images",
    ),
    "float images": (
        lambda root: np.savez(root, x_train=np.zeros((4, 5, 5)), y_train=[0, 1, 0, 1]),
        "expected uint8",
    ),
}


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_bad_sources_are_one_error_and_nothing_is_written(tmp_path, case):
    make, message = BAD_SOURCES[case]
    source = tmp_path / (
        "data.npz" if "labels" in case or "images" in case or "shapes" in case else "data"
    )
    make(source)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config_for(source), tmp_path / "workdir")
    assert sorted(tmp_path.rglob("*")) == before  # No workdir, no cache.


def test_bad_files_are_skipped_when_asked(tmp_path):
    _folder_with_bad_files(tmp_path / "data")
    config = sources.resolve(config_for(tmp_path / "data", data__skip_bad_files=True))
    assert loading.num_examples("own_data", "train", data_dir=config.data.data_dir) == 48


def test_the_cli_reports_a_bad_source_as_one_error_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnn_lab.train",
            "--config=configs/own_data.py",
            f"--config.data.source_dir={tmp_path / 'nowhere'}",
            f"--workdir={tmp_path / 'w'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: config.data.source_dir=")
    assert not (tmp_path / "w").exists()


def test_smoke_slices_are_capped_at_a_small_split(tmp_path):
    config = sources.resolve(config_for(make_folder(tmp_path / "data"), "smoke"))
    assert config.data.train_split == "train[:512]"
    data = inputs.make_inputs(
        config.data, 8, jax.sharding.Mesh(jax.devices()[:1], ("data",)), seed=0
    )
    assert data.num_examples("train") == 48 and data.num_examples("val") == 6


def _resumed_equals_uninterrupted(tmp_path, source, mode):
    config = config_for(source, data__input_mode=mode)
    config.schedule.name = "constant"  # The rate of a step must not depend on the run's length.
    config.schedule.warmup_epochs = 0.0
    config.train.num_epochs = 2
    train_and_evaluate(config, tmp_path / "whole")
    config.train.num_epochs = 1
    train_and_evaluate(config, tmp_path / "halves")
    config.train.num_epochs = 2
    train_and_evaluate(config, tmp_path / "halves", allow_config_changes=("train.num_epochs",))
    (_, whole, _), (_, halves, saved) = (
        cnn_lab.load_run(tmp_path / w, "latest") for w in ("whole", "halves")
    )
    leaves = jax.tree.leaves(jax.tree.map(np.array_equal, whole["params"], halves["params"]))
    assert leaves and all(leaves)
    return saved


@pytest.mark.slow
def test_a_folder_run_resumes_bitwise_exact_and_keeps_its_class_names(tmp_path):
    saved = _resumed_equals_uninterrupted(tmp_path, make_folder(tmp_path / "data"), "device")
    assert json.loads((tmp_path / "halves" / sources.CLASSES_FILE).read_text()) == [
        "cat",
        "dog",
        "eel",
    ]
    assert tuple(saved.data.class_names) == ("cat", "dog", "eel")


@pytest.mark.slow
def test_an_npz_run_streams_and_resumes_bitwise_exact(tmp_path):
    _resumed_equals_uninterrupted(tmp_path, make_npz(tmp_path / "data.npz", n=90), "streaming")


@pytest.mark.slow
def test_resnet20_trains_on_a_folder_and_the_tools_name_its_classes(tmp_path):
    from cnn_lab.tools import evaluate, inspect_run

    config = own_data_config.get_config("resnet20,smoke")
    config.data.source_dir = str(make_folder(tmp_path / "data", per_class=10))
    config.train.batch_size, config.eval.batch_size, config.train.progress_bar = 8, 8, False
    config.model.depth = 8
    results = train_and_evaluate(config, tmp_path / "w")
    assert results["test"]["count"] == 3
    saved = json.loads((tmp_path / "w" / "config.json").read_text())["config"]
    assert saved["model"]["num_classes"] == 3
    rows, _, _ = evaluate.evaluate_run(tmp_path / "w", "latest", variants=("raw",))
    assert rows[0]["class_names"] == ["cat", "dog", "eel"]
    assert "cat: " in evaluate.format_table(rows)
    written = inspect_run.inspect_run(tmp_path / "w", "latest", maps=2, max_examples=8)
    assert json.loads(written["confusion_json"].read_text())["classes"] == ["cat", "dog", "eel"]


def test_built_in_data_sets_carry_their_class_names(tmp_path):
    from cnn_lab.configs import lenet_digits

    config = lenet_digits.get_config()
    config.data.data_dir = str(tmp_path)
    assert sources.class_names(config.data) == tuple("0123456789")
    config.data.classes = (3, 5)
    assert sources.class_names(config.data) == ("3", "5")


@pytest.mark.slow
def test_notebook_arrays_train_and_a_second_call_resumes(tmp_path):
    from cnn_lab.tools.arrays import train_on_arrays

    rng = np.random.default_rng(0)
    labels = np.arange(80) % 2
    images = (rng.random((80, 8, 8)) * 90 + labels[:, None, None] * 120).astype(np.uint8)
    config = config_for("unused", "smoke")
    config.train.num_epochs = 1
    kwargs = dict(class_names=["dark", "light"], cache_dir=tmp_path / "cache")
    results = train_on_arrays(config, tmp_path / "w", images, labels, **kwargs)
    assert results["test"]["count"] == 8
    saved = list((tmp_path / "cache").glob("*.npz"))
    assert len(saved) == 1
    config.train.num_epochs = 2
    changed = ("train.num_epochs",)
    train_on_arrays(config, tmp_path / "w", images, labels, **kwargs, allow_config_changes=changed)
    assert list((tmp_path / "cache").glob("*.npz")) == saved  # The same file: a resume.
    assert json.loads((tmp_path / "w" / "classes.json").read_text()) == ["dark", "light"]
    steps = [r["step"] for r in read_metrics(tmp_path / "w") if r["split"] == "val"]
    assert steps == [8, 16]


def test_download_asks_tfds_to_prepare_only_when_set(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from cnn_lab.configs import convnet_mnist

    prepared = []
    monkeypatch.setattr(
        tfds.core.DatasetBuilder,
        "download_and_prepare",
        lambda self, **kw: prepared.append(self.name),
    )
    config = convnet_mnist.get_config()
    config.data.data_dir = str(tmp_path)
    assert sources.resolve(config) is config and prepared == []
    config.data.download = True
    sources.resolve(config)
    assert prepared == ["mnist"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">{1 + array.ndim}I", 0x800 + array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_the_fashion_mnist_folder_script_keeps_the_label_order(tmp_path):
    from cnn_lab.launch import fashion_mnist_folder

    rng = np.random.default_rng(0)
    for split, (images_file, labels_file) in fashion_mnist_folder.FASHION_MNIST_FILES.items():
        n = 40 if split == "train" else 20
        _write_idx(tmp_path / images_file, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / labels_file, np.arange(n) % 10)
    counts = fashion_mnist_folder.write_folder(tmp_path, tmp_path / "png")
    assert counts == {"train": 40, "test": 20}
    assert (tmp_path / "png" / "train" / "0-T-shirt_top" / "00000.png").is_file()
    config = sources.resolve(config_for(tmp_path / "png"))
    assert config.data.channels == 1 and config.data.image_size == 28
    names = sources.class_names(config.data)
    assert names[0] == "0-T-shirt_top" and names[9] == "9-Ankle_boot"
    _, labels = loading.load_split("own_data", "test", data_dir=config.data.data_dir)
    assert sorted(labels.tolist()) == sorted((np.arange(20) % 10).tolist())


def test_a_config_of_an_unlisted_data_set_leaves_its_statistics_unset():
    from cnn_lab.configs import common

    config = common.get_base_config("my_data", image_size=32)
    assert (config.data.channels, config.model.num_classes, config.data.mean) == (None, None, None)
    config.lock()
    config.data.mean = (0.5,)  # Typed placeholders: settable from the command line.
    config.data.channels = 1


def test_a_deleted_copy_is_named_and_made_again_at_the_same_place(tmp_path):
    import shutil

    config = sources.resolve(config_for(make_folder(tmp_path / "data", per_class=5)))
    shutil.rmtree(tmp_path / "data" / own_data.CACHE_SUFFIX)
    with pytest.raises(ValueError, match="No decoded copy of own data"):
        loading.num_examples("own_data", "train", data_dir=config.data.data_dir)
    again = sources.resolve(config_for(tmp_path / "data"))
    assert again.data.data_dir == config.data.data_dir
    assert loading.num_examples("own_data", "train", data_dir=again.data.data_dir) == 9


def test_a_zoo_config_given_a_source_dir_trains_on_that_data(tmp_path):
    from cnn_lab.configs import lenet_digits

    config = lenet_digits.get_config("smoke")  # Built for digits: 10 classes, its mean.
    config.data.source_dir = str(make_folder(tmp_path / "images"))
    resolved = sources.resolve(config)
    assert resolved.data.name == "own_data" and resolved.model.num_classes == 3
    assert (
        resolved.data.channels == 3 and resolved.data.image_size == 32
    )  # Colour; the recipe size.
    assert resolved.data.mean != config.data.mean  # The data's, not digits'.
    assert sources.class_names(resolved.data) == ("cat", "dog", "eel")
    assert config.data.name == "digits"  # The given config is left as it was.


@pytest.mark.slow  # Two short runs.
def test_a_run_on_own_data_starts_from_another_with_a_new_head_of_its_classes(tmp_path):
    config = config_for(make_folder(tmp_path / "three"), train__num_epochs=1)
    train_and_evaluate(config, tmp_path / "source")
    target = config_for(make_folder(tmp_path / "two", classes=("ant", "bee")), train__num_epochs=1)
    target.init_from.workdir = str(tmp_path / "source")
    target.init_from.head = ("Dense_1",)  # The MLP's output layer: new, of the data's 2 classes.
    train_and_evaluate(target, tmp_path / "target")
    (_, source, _), (_, tuned, saved) = (
        cnn_lab.load_run(tmp_path / w, "latest") for w in ("source", "target")
    )
    assert tuned["params"]["Dense_1"]["kernel"].shape == (16, 2)
    assert source["params"]["Dense_1"]["kernel"].shape == (16, 3)
    assert tuple(saved.data.class_names) == ("ant", "bee")
