"""AlexNet, VGG and ResNet: published parameter counts, shapes, modes and variants."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_lab.models import MODELS, get_model
from cnn_lab.models.alexnet import AlexNet, local_response_norm
from cnn_lab.models.layers import StochasticDepth
from cnn_lab.models.resnet import ResidualBlock, ResNet
from cnn_lab.models.vgg import VGG
from cnn_lab.tools.summary import summarize


def key(seed: int) -> jax.Array:
    """A typed key of the "rbg" generator: XLA compiles its draws far faster than threefry's on
    CPU (seconds per model init), and the key carries its generator, so no global setting."""
    return jax.random.key(seed, impl="rbg")


def abstract_variables(model: nn.Module, image_size: int, channels: int = 3) -> dict:
    """The model's variables as shapes only: no memory and no compute, even for ResNet-152."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(key(0), x, train=False), x)


def random_variables(model: nn.Module, x: jax.Array) -> dict:
    """Variables filled from numpy: skips compiling `init` (seconds per model on a busy CPU)."""
    rng = np.random.default_rng(0)

    def fill(path, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        if path[-1].key == "var":  # BatchNorm's running variance must stay positive
            return np.ones(leaf.shape, leaf.dtype)
        fan_in = max(1, int(np.prod(leaf.shape[:-1])))
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    shapes = abstract_variables(model, x.shape[1], x.shape[3])
    return jax.tree_util.tree_map_with_path(fill, shapes)


def num_params(model: nn.Module, image_size: int) -> int:
    """Trainable parameters; BatchNorm contributes scale and bias, its batch_stats are excluded."""
    params = abstract_variables(model, image_size)["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def cifar_resnet_option_a(depth: int, num_classes: int = 10) -> int:
    """Parameters of He et al.'s CIFAR ResNet counted by hand: 3x3 convs without bias, BN scale
    and bias, option A shortcuts (no parameters), global pool and one dense layer."""
    n = (depth - 2) // 6

    def conv_bn(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out + 2 * c_out

    total = conv_bn(3, 16)  # stem
    for c_in, c in ((16, 16), (16, 32), (32, 64)):
        total += conv_bn(c_in, c) + (2 * n - 1) * conv_bn(c, c)  # first conv may widen
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018), (110, 1_727_962)],
)
def test_cifar_resnet_counts_match_the_paper(depth: int, expected: int):
    # The paper reports 0.27M, 0.46M, 0.66M, 0.85M and 1.7M (Table 6).
    assert cifar_resnet_option_a(depth) == expected
    assert num_params(ResNet(10, depth=depth, family="cifar"), 32) == expected


# AlexNet, single tower, 1000 classes, 227x227 input (conv: k*k*c_in*c_out + c_out):
#   conv1 11*11*3*96   + 96   =     34,944   (55x55x96)
#   conv2  5*5*96*256  + 256  =    614,656   (27x27x256)
#   conv3  3*3*256*384 + 384  =    885,120   (13x13x384)
#   conv4  3*3*384*384 + 384  =  1,327,488
#   conv5  3*3*384*256 + 256  =    884,992   (13x13x256, pooled to 6x6x256)
#   fc6    6*6*256*4096 + 4096 = 37,752,832
#   fc7    4096*4096 + 4096   = 16,781,312
#   fc8    4096*1000 + 1000   =  4,097,000
#   total                     = 62,378,344
# torchvision's alexnet (61,100,840) is the 2014 "one weird trick" net with 64 first filters.
PUBLISHED_COUNTS = [
    # torchvision's resnet18/34/50/101/152, vgg11/16/16_bn/19_bn, 1000 classes.
    ("resnet", {"depth": 18}, 224, 11_689_512),
    ("resnet", {"depth": 34}, 224, 21_797_672),
    ("resnet", {"depth": 50}, 224, 25_557_032),
    ("resnet", {"depth": 101}, 224, 44_549_160),
    ("resnet", {"depth": 152}, 224, 60_192_808),
    ("vgg", {"depth": 11}, 224, 132_863_336),
    ("vgg", {"depth": 16}, 224, 138_357_544),
    ("vgg", {"depth": 16, "batch_norm": True}, 224, 138_365_992),
    ("vgg", {"depth": 19, "batch_norm": True}, 224, 143_678_248),
    ("alexnet", {}, 227, 62_378_344),
    # Zhang et al. (2017), Table 1: small AlexNet on 28x28 CIFAR-10 crops.
    ("alexnet", {"variant": "cifar", "num_classes": 10}, 28, 1_387_786),
    # kuangliu/pytorch-cifar VGG('VGG16') (with BatchNorm), 10 classes.
    ("vgg", {"batch_norm": True, "hidden_sizes": (), "num_classes": 10}, 32, 14_728_266),
]


@pytest.mark.parametrize(("name", "fields", "image_size", "expected"), PUBLISHED_COUNTS)
def test_parameter_counts_match_published_figures(name, fields, image_size, expected):
    model = get_model(ml_collections.ConfigDict({"name": name, "num_classes": 1000, **fields}))
    assert num_params(model, image_size) == expected


def test_resnet_projection_shortcuts_add_only_the_projections():
    # Option B on ResNet-20: 1x1 conv + BN where the width doubles (16->32, 32->64).
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    model = ResNet(10, depth=20, family="cifar", shortcut="B")
    assert num_params(model, 32) == 269_722 + extra


def test_alexnet_first_layer_is_55x55x96_with_34944_parameters():
    model = AlexNet(1000)
    variables = abstract_variables(model, 227)
    conv1 = variables["params"]["conv1"]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(conv1)) == 34_944

    def conv1_output(variables, x):
        _, state = model.apply(
            variables,
            x,
            train=False,
            capture_intermediates=lambda module, _: module.name == "conv1",
            mutable=["intermediates"],
        )
        return state["intermediates"]["conv1"]["__call__"][0]

    x = jax.ShapeDtypeStruct((2, 227, 227, 3), jnp.float32)
    assert jax.eval_shape(conv1_output, variables, x).shape == (2, 55, 55, 96)


FULL_SIZE = [
    ("alexnet", {}, (227, 256)),
    ("alexnet", {"variant": "cifar", "local_response_norm": True}, (28, 32)),
    ("vgg", {"depth": 13}, (224, 64)),
    ("vgg", {"depth": 19, "batch_norm": True, "hidden_sizes": (512,)}, (32, 48)),
    ("resnet", {"depth": 50}, (224, 160)),
    ("resnet", {"depth": 34, "preactivation": True, "width": 0.5}, (96, 33)),
    ("resnet", {"depth": 56, "family": "cifar", "stochastic_depth_rate": 0.5}, (32, 40)),
]


@pytest.mark.parametrize(("name", "fields", "sizes"), FULL_SIZE)
def test_logits_shape_for_several_inputs_and_class_counts(name, fields, sizes):
    for size, num_classes, channels in zip(sizes, (10, 37), (3, 1), strict=True):
        config = ml_collections.ConfigDict({"name": name, "num_classes": num_classes, **fields})
        model = get_model(config)
        variables = abstract_variables(model, size, channels)
        x = jax.ShapeDtypeStruct((3, size, size, channels), jnp.float32)
        rngs = {"dropout": key(1), "stochastic_depth": key(2)}
        forward = functools.partial(model.apply, train=True, rngs=rngs, mutable=["batch_stats"])
        logits, _ = jax.eval_shape(forward, variables, x)
        assert logits.shape == (3, num_classes)
        assert logits.dtype == jnp.float32


# Small members of each family that run for real; compiling them dominates the test time.
TINY = [
    AlexNet(5, variant="cifar", local_response_norm=True),
    VGG(5, depth=11, batch_norm=True, hidden_sizes=(16,)),
    ResNet(
        5,
        depth=8,
        family="cifar",
        width=0.25,
        stochastic_depth_rate=0.5,
        bn_momentum=0.5,
        bn_epsilon=1e-3,
    ),
    ResNet(
        5,
        depth=8,
        family="cifar",
        width=0.25,
        preactivation=True,
        shortcut="C",
        stochastic_depth_rate=0.5,
        stochastic_depth_mode="sample",
    ),
]


@pytest.mark.parametrize("model", TINY, ids=lambda m: type(m).__name__)
def test_evaluation_is_deterministic_and_training_is_random(model: nn.Module):
    x = jax.random.normal(key(0), (4, 32, 32, 3))
    variables = random_variables(model, x)
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_array_equal(evaluate(variables, x), evaluate(variables, x))
    assert evaluate(variables, x).shape == (4, 5)

    @jax.jit
    def train(variables, rng):
        rngs = {"dropout": rng, "stochastic_depth": rng}
        return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])

    (first, state), (again, _) = train(variables, key(2)), train(variables, key(2))
    np.testing.assert_array_equal(first, again)  # randomness only from the given keys
    # Training moves BatchNorm's running statistics; evaluation cannot (batch_stats immutable).
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables, {**variables, **state})
    assert any(jax.tree.leaves(changed)) == ("batch_stats" in variables)
    # Each tiny model has dropout or stochastic depth, so other keys give other outputs.
    outputs = [train(variables, key(k))[0] for k in range(3, 8)]
    assert any(not np.allclose(outputs[0], out) for out in outputs[1:])


@pytest.mark.parametrize("preactivation", [False, True])
def test_zero_init_residual_makes_each_block_an_identity(preactivation: bool):
    block = ResidualBlock(
        filters=8,
        strides=1,
        bottleneck=True,
        shortcut="A",
        preactivation=preactivation,
        zero_init_last=True,
        conv=nn.Conv,
        norm=functools.partial(nn.BatchNorm, use_running_average=True),
        act=nn.relu,
        drop_path=functools.partial(StochasticDepth, 0.0),
    )
    x = jax.random.normal(key(0), (2, 5, 5, 32))
    variables = jax.jit(functools.partial(block.init, train=False))(key(1), x)
    y = block.apply(variables, x, train=False)
    np.testing.assert_allclose(y, x if preactivation else nn.relu(x), atol=1e-6)


def test_width_multiplier_scales_every_stage():
    params = abstract_variables(ResNet(10, depth=20, family="cifar", width=2.0), 32)["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
    assert params["stage3_block3"]["Conv_1"]["kernel"].shape == (3, 3, 128, 128)


def test_local_response_norm_matches_the_papers_formula():
    x = np.random.default_rng(0).standard_normal((1, 2, 2, 7)).astype(np.float32)
    size, k, alpha, beta = 5, 2.0, 1e-1, 0.75
    expected = np.empty_like(x)
    for i in range(7):  # the sum runs over channels max(0, i - n/2) .. min(N - 1, i + n/2)
        window = x[..., max(0, i - size // 2) : min(7, i + size // 2 + 1)]
        expected[..., i] = x[..., i] / (k + alpha * np.sum(window**2, axis=-1)) ** beta
    np.testing.assert_allclose(local_response_norm(x, size, k, alpha, beta), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (ResNet(10, depth=19), "config.model.depth"),
        (ResNet(10, depth=21, family="cifar"), "6n\\+2"),
        (ResNet(10, family="mnist"), "config.model.family"),
        (ResNet(10, shortcut="D"), "config.model.shortcut"),
        (VGG(10, depth=12), "config.model.depth"),
        (AlexNet(10, variant="tiny"), "config.model.variant"),
        (ResNet(10, stochastic_depth_rate=1.0), "stochastic_depth_rate"),
    ],
)
def test_bad_fields_say_what_to_change(model: nn.Module, message: str):
    with pytest.raises(ValueError, match=message):
        abstract_variables(model, 32)


def test_registry_names():
    assert {"alexnet": AlexNet, "vgg": VGG, "resnet": ResNet}.items() <= MODELS.items()


def test_summary_lists_layers_parameters_and_flops():
    config = ml_collections.ConfigDict(
        {
            "model": {"name": "resnet", "num_classes": 10, "depth": 20, "family": "cifar"},
            "data": {"image_size": 32, "channels": 3},
        }
    )
    text = summarize(config, depth=1)
    assert "stage3_block3" in text
    assert "float32[1,8,8,64]" in text
    assert "params: 269,722" in text
    assert "FLOPs per image" in text


def test_local_response_norm_is_differentiable_under_jit():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))

    def by_slices(x):  # The same sum over 5 neighbouring channels, written out.
        padded = jnp.pad(jnp.square(x), ((0, 0), (0, 0), (0, 0), (2, 2)))
        summed = sum(padded[..., i : i + x.shape[-1]] for i in range(5))
        return (x / (2.0 + 1e-2 * summed) ** 0.75).sum()

    grad = jax.jit(jax.grad(lambda x: local_response_norm(x, 5, 2.0, 1e-2, 0.75).sum()))(x)
    np.testing.assert_allclose(grad, jax.grad(by_slices)(x), rtol=1e-5, atol=1e-6)
