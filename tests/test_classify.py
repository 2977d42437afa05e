"""`python -m cnn_lab.predict`: image files classified with a run's preprocessing and names."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from cnn_lab.configs import lenet_digits
from cnn_lab.data import augment, loading
from cnn_lab.models import get_model
from cnn_lab.saved_run import load_run
from cnn_lab.tools.classify import decode, predict_files, preprocess_image
from cnn_lab.weights.importing import write_run

NAMES = [f"digit {k}" for k in range(10)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """LeNet-5 of digits (32x32 grey) with random weights and class names."""
    config = lenet_digits.get_config()
    variables = get_model(config.model).init(
        jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32), train=False
    )
    directory = tmp_path_factory.mktemp("run")
    write_run(directory, config, {"params": variables["params"], "batch_stats": {}}, {}, NAMES)
    return directory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """PNGs of several sizes and channels (one in a subfolder) and a file that is no image."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (32, 32, 1)), ("b.png", (40, 60, 3)), ("sub/c.png", (8, 8, 4))):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        (folder / name).write_bytes(tf.io.encode_png(pixels).numpy())
    (folder / "sub" / "broken.png").write_bytes(b"not a png")
    return folder


def test_every_image_gets_the_runs_probabilities_and_unreadable_ones_a_reason(run_dir, images):
    results = predict_files(run_dir, [images, images / "missing.png"], top_k=3)
    by_file = {r["file"]: r for r in results}
    assert set(by_file) == {
        str(images / n) for n in ("a.png", "b.png", "sub/c.png", "sub/broken.png", "missing.png")
    }
    assert "cannot be decoded" in by_file[str(images / "sub/broken.png")]["error"]
    assert "no such file" in by_file[str(images / "missing.png")]["error"]
    model, variables, config = load_run(run_dir)
    for name in ("a.png", "b.png", "sub/c.png"):
        image = preprocess_image(decode(images / name), config.data)  # (32, 32, 1)
        expected = np.asarray(jax.nn.softmax(model.apply(variables, image[None], train=False)))[0]
        top = by_file[str(images / name)]["top_k"]
        assert [t["label"] for t in top] == list(np.argsort(-expected)[:3])
        assert [t["class"] for t in top] == [NAMES[t["label"]] for t in top]
        np.testing.assert_allclose(
            [t["probability"] for t in top], np.sort(expected)[::-1][:3], atol=1e-6
        )


def test_preprocessing_is_evaluations(run_dir):
    # Device-mode evaluation resizes whole square images; a 24x24 digit is resized to 32x32.
    _, _, config = load_run(run_dir)
    pixels = np.random.default_rng(1).integers(0, 256, (24, 24, 1), dtype=np.uint8)
    resized = loading._resize(pixels[None], 32)
    expected = augment.eval_preprocess(resized, mean=config.data.mean, std=config.data.std)[0]
    np.testing.assert_array_equal(preprocess_image(pixels, config.data), np.asarray(expected))


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnn_lab.predict", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_prints_class_names_and_writes_json(run_dir, images, tmp_path):
    out = _predict(
        f"--workdir={run_dir}", "--top_k=2", f"--json={tmp_path / 'p.json'}", str(images)
    )
    assert out.returncode == 0, out.stderr
    assert f"{images / 'a.png'}: digit " in out.stdout
    assert f"{images / 'sub/broken.png'}: not classified: cannot be decoded" in out.stdout
    written = json.loads((tmp_path / "p.json").read_text())
    assert len(written) == 4 and len(written[0]["top_k"]) == 2


def test_command_with_nothing_readable_or_no_checkpoint_is_one_error(run_dir, images, tmp_path):
    out = _predict(f"--workdir={run_dir}", str(images / "sub" / "broken.png"))
    assert out.returncode == 1 and "error: No image could be read" in out.stderr
    (tmp_path / "config.json").write_bytes((run_dir / "config.json").read_bytes())
    out = _predict(f"--workdir={tmp_path}", str(images))
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "has no best/ directory" in errors[0]
