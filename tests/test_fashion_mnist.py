"""Real Fashion-MNIST, prepared offline from Debian's IDX files, trains to a real accuracy."""

import importlib
import math
from pathlib import Path

import pytest

from cnn_lab import workdir
from cnn_lab.configs import lenet_fashion_mnist
from cnn_lab.data import loading
from cnn_lab.train import train_and_evaluate

SOURCE = Path(loading.FASHION_MNIST_SOURCE_DIRS[0])


@pytest.fixture(scope="module")
def fashion_data_dir(tmp_path_factory):
    """One TFDS data_dir for the module: Fashion-MNIST is prepared from the IDX files once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").exists(),
    reason=f"real Fashion-MNIST not found in {SOURCE}: apt-get install dataset-fashion-mnist",
)
def test_lenet_learns_real_fashion_mnist(fashion_data_dir, tmp_path):
    config = lenet_fashion_mnist.get_config()
    config.data.data_dir = fashion_data_dir  # Prepared from the IDX files, once per module.
    config.data.train_split = "train[:30000]"
    config.train.num_epochs = 1
    config.train.progress_bar = False
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["test"]["count"] == 10_000
    assert results["test"]["accuracy"] > 0.82


FASHION_CONFIGS = sorted(
    p.stem
    for p in Path(__file__).resolve().parents[1].joinpath("configs").glob("*_fashion_mnist.py")
)


def test_every_model_family_has_a_fashion_mnist_config():
    assert {"mlp", "lenet", "convnet", "alexnet", "vgg", "resnet20", "odenet"} <= {
        name.removesuffix("_fashion_mnist") for name in FASHION_CONFIGS
    }


@pytest.mark.slow
@pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").exists(),
    reason=f"real Fashion-MNIST not found in {SOURCE}: apt-get install dataset-fashion-mnist",
)
@pytest.mark.parametrize("name", FASHION_CONFIGS)
def test_fashion_mnist_config_trains_in_smoke_form(name, fashion_data_dir, tmp_path):
    config = importlib.import_module(f"cnn_lab.configs.{name}").get_config("smoke")
    config.data.data_dir = fashion_data_dir
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["test"]["count"] == 256  # every example of test[:256]
    assert math.isfinite(results["val"]["loss"])
    val = [r for r in workdir.read_metrics(tmp_path / "run") if r["split"] == "val"]
    assert len(val) == config.train.num_epochs and all(r["epoch_seconds"] > 0 for r in val)
