"""Real Fashion-MNIST, prepared offline from Debian's IDX files, trains to a real accuracy."""

import importlib
import math
from pathlib import Path

import pytest

from cnn_lab import sweep, workdir
from cnn_lab.configs import common, lenet_fashion_mnist
from cnn_lab.data import loading
from cnn_lab.tools import baseline, summary
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


def _table_steps_with_overrides() -> list[tuple[str, str, dict, bool]]:
    """Each results-table step that changes its config: (name, config module, the fields it
    sets with an axis at its last value, whether cnn_lab.baseline runs it)."""
    from cnn_lab.launch import fashion_mnist_results

    steps = []
    for name, args in fashion_mnist_results.STEPS:
        config_file = next(a.removeprefix("--config=") for a in args if a.startswith("--config="))
        overrides = {}
        for arg in args:
            if arg.startswith("--config."):
                overrides |= sweep.parse_axis(arg.removeprefix("--config."))[0]
            elif arg.startswith("--axis="):
                overrides |= sweep.parse_axis(arg.removeprefix("--axis="))[-1]
        if overrides:
            steps.append((name, Path(config_file).stem, overrides, "cnn_lab.baseline" in args))
    return steps


TABLE_STEPS_WITH_OVERRIDES = _table_steps_with_overrides()


@pytest.mark.slow
@pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").exists(),
    reason=f"real Fashion-MNIST not found in {SOURCE}: apt-get install dataset-fashion-mnist",
)
@pytest.mark.parametrize(
    "name, config_name, overrides, is_baseline",
    TABLE_STEPS_WITH_OVERRIDES,
    ids=[step[0] for step in TABLE_STEPS_WITH_OVERRIDES],
)
def test_every_table_step_runs_in_smoke_form(
    name, config_name, overrides, is_baseline, fashion_data_dir, tmp_path
):
    # The rows that set fields (the MLP baseline, ODE-Net's ResNet control, the snapshot
    # schedule, ResNet-56 with stochastic depth) run as the table runs them, on smoke splits.
    config = importlib.import_module(f"cnn_lab.configs.{config_name}").get_config()
    config = common.apply_mode(summary.with_overrides(config, overrides), "smoke")
    config.data.data_dir = fashion_data_dir
    config.train.num_epochs = 3  # 12 steps: 8 after the warm-up, room for 5 snapshot cycles.
    run = baseline.fit_and_evaluate if is_baseline else train_and_evaluate
    results = run(config, tmp_path / "run")
    assert results["test"]["count"] == 256 and math.isfinite(results["test"]["loss"])
    saved = workdir.read_config(tmp_path / "run")
    smoke_length = "train.num_epochs"  # The one field the smoke form replaces.
    for field, value in overrides.items():
        section, name = field.split(".")
        assert field == smoke_length or saved[section][name] == value
