"""Exported models (jax.export StableHLO, TensorFlow SavedModel) give the run's logits in
their own framework alone, at batch sizes 1 and 7."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn_lab.configs import common
from cnn_lab.data import augment
from cnn_lab.models import get_model
from cnn_lab.saved_run import load_run
from cnn_lab.tools.export import CLASS_NAMES_FILE, STABLEHLO_FILE, export_run
from cnn_lab.weights.importing import write_run

TOLERANCE = 1e-5
CLASSES = [f"class {k}" for k in range(10)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A CIFAR ResNet-8 run (16x16 RGB) with random weights and BatchNorm statistics."""
    config = common.get_base_config("cifar10", image_size=16)
    config.model.name = "resnet"
    config.model.family = "cifar"
    config.model.depth = 8
    model = get_model(config.model)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
    rng = np.random.default_rng(0)
    # Logits of order 1-10 (a tolerance of 1e-5 means float32 rounding, not luck).
    variables = {
        "params": jax.tree.map(
            lambda a: np.asarray(a) + rng.normal(0, 0.05, a.shape).astype(np.float32),
            variables["params"],
        ),
        "batch_stats": jax.tree.map(
            lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32), variables["batch_stats"]
        ),
    }
    directory = tmp_path_factory.mktemp("run")
    write_run(directory, config, variables, {}, CLASSES)
    return directory


def _pixels() -> dict[int, np.ndarray]:
    """uint8 batches (B, 16, 16, 3) of sizes 1 and 7."""
    rng = np.random.default_rng(1)
    return {b: rng.integers(0, 256, (b, 16, 16, 3), dtype=np.uint8) for b in (1, 7)}


def _expected(run_dir, pixels: np.ndarray) -> np.ndarray:
    model, variables, config = load_run(run_dir)
    images = augment.eval_preprocess(pixels, mean=config.data.mean, std=config.data.std)
    return np.asarray(model.apply(variables, images, train=False))


def blocking(modules) -> str:
    """Python source that makes importing any of `modules` (and their submodules) fail."""
    return (
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {sorted(modules)!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Blocked())\n"
    )


def _run_alone(script: str, framework: str, tmp_path, inputs: dict) -> dict[int, np.ndarray]:
    """Run `script` in a fresh Python where, of cnn_lab, flax, jax and tensorflow, only
    `framework` can be imported; it reads inputs.npz and writes outputs.npz (by batch size)."""
    np.savez(tmp_path / "inputs.npz", **{str(b): x for b, x in inputs.items()})
    blocked = {"cnn_lab", "flax", "jax", "tensorflow"} - {framework}
    subprocess.run(
        [sys.executable, "-c", blocking(blocked) + script], cwd=tmp_path, check=True, timeout=300
    )
    with np.load(tmp_path / "outputs.npz") as outputs:
        return {int(b): outputs[b] for b in outputs.files}


STABLEHLO_SCRIPT = """
import numpy as np
from jax import export
exported = export.deserialize(bytearray(open(PATH, "rb").read()))
inputs = np.load("inputs.npz")
np.savez("outputs.npz", **{b: np.asarray(exported.call(inputs[b])) for b in inputs.files})
"""

SAVEDMODEL_SCRIPT = """
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(PATH).signatures["serving_default"]
inputs = np.load("inputs.npz")
np.savez("outputs.npz", **{b: serve(images=inputs[b])["logits"].numpy() for b in inputs.files})
"""


@pytest.mark.parametrize("include_preprocessing", [True, False])
def test_stablehlo_runs_in_plain_jax_with_the_runs_logits(run_dir, tmp_path, include_preprocessing):
    output = export_run(
        run_dir, "stablehlo", tmp_path / "export", include_preprocessing=include_preprocessing
    )
    pixels = _pixels()
    _, _, config = load_run(run_dir)
    inputs = (
        pixels
        if include_preprocessing
        else {
            b: np.asarray(augment.eval_preprocess(x, mean=config.data.mean, std=config.data.std))
            for b, x in pixels.items()
        }
    )
    script = f"PATH = {str(output / STABLEHLO_FILE)!r}\n" + STABLEHLO_SCRIPT
    logits = _run_alone(script, "jax", tmp_path, inputs)
    for b, x in pixels.items():
        assert logits[b].shape == (b, 10)
        np.testing.assert_allclose(logits[b], _expected(run_dir, x), rtol=0, atol=TOLERANCE)
    assert (output / CLASS_NAMES_FILE).read_text().splitlines() == CLASSES
    signature = json.loads((output / "signature.json").read_text())
    assert signature["input"]["shape"] == [None, 16, 16, 3]
    assert signature["input"]["dtype"] == ("uint8" if include_preprocessing else "float32")


def test_savedmodel_runs_in_tensorflow_alone_with_the_runs_logits(run_dir, tmp_path):
    output = export_run(run_dir, "savedmodel", tmp_path / "export", include_preprocessing=True)
    pixels = _pixels()
    script = f"PATH = {str(output)!r}\n" + SAVEDMODEL_SCRIPT
    logits = _run_alone(script, "tensorflow", tmp_path, pixels)
    for b, x in pixels.items():
        np.testing.assert_allclose(logits[b], _expected(run_dir, x), rtol=0, atol=TOLERANCE)
    assert (output / CLASS_NAMES_FILE).read_text().splitlines() == CLASSES


def test_a_fixed_batch_is_exported_as_that_batch(run_dir, tmp_path):
    from jax import export

    output = export_run(run_dir, "stablehlo", tmp_path / "export", batch="7")
    exported = export.deserialize(bytearray((output / STABLEHLO_FILE).read_bytes()))
    assert exported.in_avals[0].shape == (7, 16, 16, 3)


def test_savedmodel_without_tensorflow_names_what_to_install(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    with pytest.raises(ModuleNotFoundError, match="pip install tensorflow-cpu"):
        export_run(run_dir, "savedmodel", tmp_path / "export")


def test_unknown_format_and_batch_are_refused(run_dir, tmp_path):
    with pytest.raises(ValueError, match="--format='onnx2'"):
        export_run(run_dir, "onnx2", tmp_path / "export")
    with pytest.raises(ValueError, match="--batch='0'"):
        export_run(run_dir, "stablehlo", tmp_path / "export", batch="0")
