"""Every AlexNet/VGG/ResNet config builds its model and gives logits of the right shape."""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_lab.configs import resnet20_digits
from cnn_lab.models import RNG_STREAMS, get_model
from cnn_lab.train import train_and_evaluate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ZOO = ("alexnet", "vgg", "resnet")


def _load(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config()


def _zoo_configs() -> list[str]:
    """Names of the config files whose model is one of the zoo's, found by loading each."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
    return [n for n in names if _load(n).model.get("name") in ZOO]


ZOO_CONFIGS = _zoo_configs()


def test_the_zoo_configs_are_found():
    # Guards the discovery above: an empty or short list would make the checks below vacuous.
    assert {
        "resnet20_cifar10",
        "resnet50_imagenet",
        "vgg16_cifar10",
        "alexnet_cifar10",
        "resnet20_digits",
    } <= set(ZOO_CONFIGS)


@pytest.mark.parametrize("name", ZOO_CONFIGS)
def test_config_builds_its_model_with_logits_per_class(name: str):
    config = _load(name)
    model = get_model(config.model)  # Raises on a field the module does not take.
    size, channels = config.data.image_size, config.data.channels
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # A raw PRNG key, as shapes only.

    def init_and_apply(x, key):
        variables = model.init(key, x, train=False)
        logits = model.apply(variables, x, train=False)
        # The training path too: dropout and stochastic depth draw from their named streams.
        train_logits, _ = model.apply(
            variables,
            x,
            train=True,
            rngs={stream: key for stream in RNG_STREAMS},
            mutable=["batch_stats"],
        )
        return logits, train_logits

    # Shapes only: no parameter is allocated, so ResNet-50 at 224x224 takes a second.
    logits, train_logits = jax.eval_shape(init_and_apply, x, key)
    expected = (1, config.model.num_classes)
    assert logits.shape == expected, name
    assert train_logits.shape == expected, name


def test_resnet20_digits_smoke_run(tmp_path):
    config = resnet20_digits.get_config("smoke")
    config.data.data_dir = str(tmp_path / "tfds")  # digits is prepared there, offline.
    results = train_and_evaluate(config, tmp_path / "workdir")
    assert results["test"]["count"] == 256  # every example of test[:256]
    assert np.isfinite(results["val"]["loss"])


def test_cats_vs_dogs_first_phase_trains_only_the_new_head():
    from cnn_lab import param_groups

    config = _load("resnet50_cats_vs_dogs")
    model = get_model(config.model)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    init = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = init["params"]
    frozen_patterns = config.phases[0]["freeze"]
    trainable = [
        p for p in param_groups.paths(params) if not param_groups.matches(frozen_patterns, p)
    ]
    assert sorted(trainable) == ["head/bias", "head/kernel"]
    assert all(param_groups.matches(config.init_from.head, p) for p in trainable)
    assert "freeze" not in config.phases[1]  # Phase 2 trains every layer.
