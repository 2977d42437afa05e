"""Fine-tuning from imported ImageNet weights with configs/resnet50_cats_vs_dogs.py's recipe:
a new head, the backbone (and its BatchNorm statistics) frozen in phase 1, all of it after."""

import jax
import numpy as np
import pytest
from test_import_weights import random_torchvision_model, save_both_formats

from cnn_lab import param_groups
from cnn_lab.configs import common, resnet50_cats_vs_dogs
from cnn_lab.data import loading
from cnn_lab.saved_run import load_run
from cnn_lab.train import train_and_evaluate
from cnn_lab.weights import import_weights


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        param_groups.path_name(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    }


@pytest.mark.slow
def test_fine_tuning_an_imported_resnet_freezes_then_trains_its_backbone(tmp_path):
    source = save_both_formats(random_torchvision_model("resnet18"), tmp_path)[1]
    imported = import_weights("resnet18", source, tmp_path / "imported")
    config = resnet50_cats_vs_dogs.get_config("smoke")
    config.init_from.workdir = str(imported)  # What --config.init_from.workdir=DIR sets.
    # Digits (offline) instead of Cats vs Dogs, ResNet-18 instead of ResNet-50.
    config.model.depth = 18
    config.model.num_classes = 10
    digits = common.get_base_config("digits", image_size=32)
    config.data = digits.data
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.train_examples_per_class = 4  # 40 images: 5 steps of 8 per epoch.
    config.augment.resized_crop = False
    config.augment.flip = False
    config.train.batch_size = 8
    config.eval.batch_size = 64
    config.train.num_epochs = 2
    head_phase, all_phase = config.phases
    config.phases = (dict(head_phase, epochs=1), dict(all_phase, epochs=1))
    loading.num_classes("digits", data_dir=config.data.data_dir)
    workdir = tmp_path / "fine_tuned"
    train_and_evaluate(config, workdir)

    start = jax.device_get(load_run(imported)[1])
    boundary, end = (jax.device_get(load_run(workdir, step)[1]) for step in (5, 10))
    stats = _leaves(start["batch_stats"])
    assert stats.keys() == _leaves(boundary["batch_stats"]).keys()
    for name, value in _leaves(boundary["batch_stats"]).items():
        assert np.array_equal(value, stats[name]), name  # Frozen layers keep their statistics.
    moved = [n for n, v in _leaves(end["batch_stats"]).items() if not np.array_equal(v, stats[n])]
    assert len(moved) == len(stats)  # Phase 2 trains every layer, statistics included.
    params, at_boundary = _leaves(start["params"]), _leaves(boundary["params"])
    assert at_boundary["head/kernel"].shape == (512, 10)
    # The RGB stem, summed over its colours for grey digits.
    np.testing.assert_array_equal(
        at_boundary["stem_conv/kernel"], params["stem_conv/kernel"].sum(axis=2, keepdims=True)
    )
    assert np.array_equal(
        at_boundary["stage4_block2/Conv_1/kernel"], params["stage4_block2/Conv_1/kernel"]
    )


def test_a_freeze_pattern_matching_every_batch_norm_keeps_their_statistics():
    # resnet50_cats_vs_dogs.py's "^(?!head).*" matches every name, the inference copy's too.
    import flax.linen as nn
    import jax.numpy as jnp
    import ml_collections

    from cnn_lab import steps
    from cnn_lab.models import get_model

    model = get_model(
        ml_collections.ConfigDict(dict(name="resnet", family="cifar", depth=8, num_classes=3))
    )
    images = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False)
    frozen = resnet50_cats_vs_dogs.get_config().phases[0]["freeze"]
    with nn.intercept_methods(steps.frozen_norm_interceptor(tuple(frozen))):
        _, updated = model.apply(variables, images, train=True, mutable=["batch_stats"])
    before, after = _leaves(variables["batch_stats"]), _leaves(updated["batch_stats"])
    assert all(np.array_equal(after[name], value) for name, value in before.items())
