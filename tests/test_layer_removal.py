"""Layer removal (config.model.remove): the lectures' AlexNet variants counted by hand, the
rewiring of VGG, the MLP and the ConvNet, and bad names refused before a run starts."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_lab import user_input
from cnn_lab.configs import alexnet_digits
from cnn_lab.models import get_model
from cnn_lab.runtime import sharding


def _shapes(model_fields: dict, image_size: int, channels: int = 3) -> dict:
    """{"Dense_0/kernel": shape, ...} of the parameters of get_model(model_fields)."""
    model = get_model(ml_collections.ConfigDict(model_fields))
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _count(shapes: dict) -> int:
    return sum(int(np.prod(shape)) for shape in shapes.values())


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _alexnet_by_hand(removed: set[str], image_size: int = 224, classes: int = 1000) -> int:
    """Krizhevsky et al.'s single-tower AlexNet counted from its layer table.

    A conv has k*k*c_in*c_out + c_out parameters, a dense layer n_in*n_out + n_out; a removed
    layer passes its input on, so the next kept layer takes the channels (or features) of the
    last kept one. Max pools 3x3/2 (no padding) follow conv1, conv2 and conv5 whether or not
    those convs are kept.
    """
    convs = [  # name, features, kernel, stride, padding, pooled after
        ("conv1", 96, 11, 4, 0, True),
        ("conv2", 256, 5, 1, 2, True),
        ("conv3", 384, 3, 1, 1, False),
        ("conv4", 384, 3, 1, 1, False),
        ("conv5", 256, 3, 1, 1, True),
    ]
    total, channels, size = 0, 3, image_size
    for name, features, kernel, stride, padding, pooled in convs:
        if name not in removed:
            total += kernel * kernel * channels * features + features
            channels, size = features, _conv_out(size, kernel, stride, padding)
        if pooled:
            size = _conv_out(size, 3, 2, 0)
    width = size * size * channels  # 5*5*256 = 6400 at 224x224 for the full net
    for name, features in (("fc6", 4096), ("fc7", 4096)):
        if name not in removed:
            total += width * features + features
            width = features
    return total + width * classes + classes  # fc8, the output layer


LECTURE_VARIANTS = [
    (),
    ("fc7",),
    ("fc6", "fc7"),
    ("conv3", "conv4"),
    ("conv3", "conv4", "fc6", "fc7"),
]


def test_the_hand_count_of_the_full_net_is_the_paper_layer_table():
    # At 224x224 the final map is 5x5x256 (54 -> 26 -> 12 -> 5), not the paper's 6x6 at 227.
    full = 34_944 + 614_656 + 885_120 + 1_327_488 + 884_992
    full += 5 * 5 * 256 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert _alexnet_by_hand(set()) == full == 50_844_008


@pytest.mark.parametrize("remove", LECTURE_VARIANTS)
def test_alexnet_lecture_variants_have_the_hand_counted_parameters(remove):
    shapes = _shapes({"name": "alexnet", "num_classes": 1000, "remove": remove}, 224)
    assert _count(shapes) == _alexnet_by_hand(set(remove))


def test_alexnet_dropped_parameters_match_the_lecture_orders_of_magnitude():
    full = _alexnet_by_hand(set())
    dropped = {r: full - _alexnet_by_hand(set(r)) for r in LECTURE_VARIANTS[1:]}
    assert round(dropped[("fc7",)] / 1e6) == 17  # the lecture: 16 M
    assert 40e6 < dropped[("fc6", "fc7")] < 50e6  # about 50 M at 227x227
    assert 1e6 < dropped[("conv3", "conv4")] < 3e6  # about 1 M in the two-tower net


def test_removal_changes_only_the_next_kept_layer():
    full = _shapes({"name": "alexnet", "num_classes": 1000}, 224)
    cut = _shapes({"name": "alexnet", "num_classes": 1000, "remove": ("conv3", "fc7")}, 224)
    assert set(full) - set(cut) == {"conv3/kernel", "conv3/bias", "Dense_1/kernel", "Dense_1/bias"}
    changed = {k for k in cut if cut[k] != full[k]}
    assert changed == {"conv4/kernel"}  # fc8 (Dense_2) took 4096 features from fc6 as before
    assert cut["conv4/kernel"] == (3, 3, 256, 384)


def test_vgg_rewires_around_removed_convs_and_dense_layers():
    base = {"name": "vgg", "num_classes": 10, "depth": 11, "batch_norm": True}
    base["hidden_sizes"] = (64, 32)
    full = _shapes(base, 32)
    # VGG-11's convs: conv1_1, conv2_1, conv3_1, conv3_2, ... (Conv_0, Conv_1, Conv_2, Conv_3).
    cut = _shapes({**base, "remove": ("conv3_1", "conv5_2", "fc6")}, 32)
    gone = {"Conv_2", "BatchNorm_2", "Conv_7", "BatchNorm_7", "Dense_0"}
    assert {k.split("/")[0] for k in set(full) - set(cut)} == gone
    assert cut["Conv_3/kernel"] == (3, 3, 128, 256)  # conv3_2 now takes conv2_1's 128 channels
    assert cut["Dense_1/kernel"] == (512, 32)  # fc7 takes the 1x1x512 map
    changed = {k for k in cut if cut[k] != full[k]}
    assert changed == {"Conv_3/kernel", "Dense_1/kernel"}


def test_mlp_and_convnet_rewire_around_removed_layers():
    mlp = _shapes(
        {"name": "mlp", "num_classes": 10, "hidden_sizes": (64, 32, 16), "remove": ("fc2",)}, 8, 1
    )
    assert mlp == {
        "Dense_0/kernel": (64, 64),
        "Dense_0/bias": (64,),
        "Dense_2/kernel": (64, 16),
        "Dense_2/bias": (16,),
        "Dense_3/kernel": (16, 10),
        "Dense_3/bias": (10,),
    }
    convnet = _shapes({"name": "convnet", "num_classes": 10, "remove": ("conv2", "fc3")}, 28, 1)
    # The pools stay: 28 -> 14 -> 7, with conv1's 32 channels straight into the output layer.
    assert convnet == {
        "Conv_0/kernel": (5, 5, 1, 32),
        "Conv_0/bias": (32,),
        "Dense_1/kernel": (7 * 7 * 32, 10),
        "Dense_1/bias": (10,),
    }


def test_models_with_removals_still_apply():
    for fields, size in (
        ({"name": "alexnet", "variant": "compact", "remove": ("conv3", "conv4", "fc6")}, 32),
        ({"name": "convnet", "remove": ("conv1",)}, 28),
    ):
        model = get_model(ml_collections.ConfigDict({**fields, "num_classes": 10}))
        x = jnp.ones((2, size, size, 1), jnp.float32)
        variables = model.init(jax.random.key(0), x, train=False)
        assert model.apply(variables, x, train=False).shape == (2, 10)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "alexnet", "remove": ("fc8",)}, "conv1, conv2, conv3, conv4, conv5, fc6, fc7"),
        ({"name": "alexnet", "remove": ("fc7", "fc7")}, "repeats a name"),
        ({"name": "mlp", "hidden_sizes": (8,), "remove": ("fc2",)}, "removable layers are fc1 "),
        ({"name": "lenet5", "remove": ("conv1",)}, "alexnet, convnet, mlp, vgg"),
    ],
)
def test_bad_removals_are_refused_when_the_model_is_built(fields, message):
    with pytest.raises(ValueError, match=message):
        get_model(ml_collections.ConfigDict({**fields, "num_classes": 10}))


def test_a_bad_removal_fails_config_validation(tmp_path):
    config = alexnet_digits.get_config("smoke")
    config.model.remove = ("conv3",)  # The CIFAR variant has only conv1, conv2.
    with pytest.raises(ValueError, match="removable layers are conv1, conv2, fc3, fc4"):
        user_input.validate(config, sharding.make_mesh(jax.devices()[:1]))
