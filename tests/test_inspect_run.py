"""`python -m cnn_lab.tools.inspect_run`: filters, top patches over receptive fields, confusion, curves."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnn_lab import metric_writer, saved_run
from cnn_lab.configs import lenet_digits
from cnn_lab.tools import inspect_run
from cnn_lab.train import train_and_evaluate

MAPS = 4


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """A one-epoch LeNet-5 run on digits, its curves deleted, then inspected."""
    config = lenet_digits.get_config("smoke")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.train.num_epochs = 1
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, workdir)
    (workdir / metric_writer.CURVES_FILE).unlink()
    written = inspect_run.inspect_run(workdir, "latest", maps=MAPS, max_examples=128)
    return workdir, written


def _image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _grid_side(tiles: int, tile: int) -> int:
    scale = math.ceil(inspect_run.MIN_TILE / tile)
    return tiles * (tile * scale + inspect_run.BORDER) + inspect_run.BORDER


def test_filter_grid_shows_every_first_layer_filter(inspected):
    _, written = inspected
    image = _image(written["filters"])
    # LeNet-5's first layer: 6 filters of 5x5, in 3 columns and 2 rows.
    assert image.shape == (_grid_side(2, 5), _grid_side(3, 5), 3)
    assert image.std() > 0


def test_filters_are_normalised_each_on_its_own_and_rgb():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 3, 4)) * np.array([1, 10, 100, 1000])
    tiles = inspect_run.filter_tiles(kernel)
    assert len(tiles) == 4
    for f, tile in enumerate(tiles):
        assert tile.shape == (3, 3, 3)
        np.testing.assert_allclose([tile.min(), tile.max()], [0.0, 1.0], atol=1e-6)
        low, high = kernel[..., f].min(), kernel[..., f].max()
        np.testing.assert_allclose(tile, (kernel[..., f] - low) / (high - low), atol=1e-6)


def test_receptive_fields_of_lenet(inspected):
    workdir, _ = inspected
    model, variables, _ = saved_run.load_run(workdir, "latest")
    layers = inspect_run.conv_layers(model, variables, (32, 32, 1))
    assert [layer.name for layer in layers] == ["Conv_0", "Conv_1"]
    apply = inspect_run.layer_outputs(model, tuple(layer.path for layer in layers))
    boxes = {}
    for layer in layers:

        def unit(variables, image, position, path=layer.path):
            return jnp.sum(apply(variables, image[None])[0][path][0][position[0], position[1]])

        positions = np.array([[0, 0], [3, 4]])
        boxes[layer.name] = inspect_run.receptive_fields(
            unit, variables, (32, 32, 1), positions, jax.random.PRNGKey(0)
        ).tolist()
    # conv 5x5; then pool 2 (6x6, stride 2) and conv 5x5: 6 + 4 * 2 = 14 pixels.
    assert boxes["Conv_0"] == [[0, 0, 5, 5], [3, 4, 8, 9]]
    assert boxes["Conv_1"] == [[0, 0, 14, 14], [6, 8, 20, 22]]


def test_top_patch_grids(inspected):
    _, written = inspected
    for name, field in (("Conv_0", 5), ("Conv_1", 14)):
        image = _image(written[f"patches_{name}"])
        assert image.shape == (_grid_side(MAPS, field), _grid_side(inspect_run.TOP, field), 3)
        assert image.std() > 0


def test_confusion_matrix_and_per_class_accuracy(inspected):
    workdir, written = inspected
    table = json.loads(written["confusion_json"].read_text())
    confusion = np.array(table["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == table["count"] == 128
    assert table["accuracy"] == pytest.approx(np.trace(confusion) / 128)
    rows = confusion.sum(1)
    expected = [confusion[k, k] / rows[k] if rows[k] else math.nan for k in range(10)]
    np.testing.assert_allclose(table["per_class_accuracy"], expected)  # NaN: class unseen
    assert _image(written["confusion"]).std() > 0
    assert written["confusion"] == workdir / inspect_run.INSPECT_DIR / "confusion_val.png"


def test_missing_curves_are_drawn(inspected):
    workdir, written = inspected
    assert written["curves"] == workdir / metric_writer.CURVES_FILE
    assert _image(written["curves"]).std() > 0
