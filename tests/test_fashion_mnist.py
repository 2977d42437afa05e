"""Real Fashion-MNIST, prepared offline from Debian's IDX files, trains to a real accuracy."""

from pathlib import Path

import pytest

from cnn_lab.configs import lenet_fashion_mnist
from cnn_lab.data import loading
from cnn_lab.train import train_and_evaluate

SOURCE = Path(loading.FASHION_MNIST_SOURCE_DIRS[0])


@pytest.mark.slow
@pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").exists(),
    reason=f"real Fashion-MNIST not found in {SOURCE}: apt-get install dataset-fashion-mnist",
)
def test_lenet_learns_real_fashion_mnist(tmp_path):
    config = lenet_fashion_mnist.get_config()
    config.data.data_dir = str(tmp_path / "tfds")  # prepared here from the IDX files
    config.data.train_split = "train[:30000]"
    config.train.num_epochs = 1
    config.train.progress_bar = False
    results = train_and_evaluate(config, tmp_path / "run")
    assert results["test"]["count"] == 10_000
    assert results["test"]["accuracy"] > 0.82
