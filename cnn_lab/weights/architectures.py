"""The torchvision architectures cnn_lab imports: each one's cnn_lab model config and the
PyTorch name of every cnn_lab layer."""

import dataclasses
import re
from collections.abc import Callable

from cnn_lab.models.resnet import IMAGENET_DEPTHS
from cnn_lab.models.vgg import DEPTHS as VGG_DEPTHS


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One importable network.

    Attributes:
      model: the config.model fields (besides num_classes) of the cnn_lab model.
      torch_module: the PyTorch module name ("layer1.0.conv1") of a cnn_lab module path
        ("stage1_block1/Conv_0").
      flattened: cnn_lab dense layers fed by a flattened (H, W, C) map, with (H, W): PyTorch
        flattens (C, H, W), so their rows are reordered.
    """

    model: dict
    torch_module: Callable[[str], str]
    flattened: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


# Inside a residual block: cnn_lab's names -> torchvision's.
_BLOCK_LAYERS = {
    **{f"Conv_{i}": f"conv{i + 1}" for i in range(3)},
    **{f"BatchNorm_{i}": f"bn{i + 1}" for i in range(3)},
    "proj_conv": "downsample.0",
    "proj_norm": "downsample.1",
}


def _resnet_module(path: str) -> str:
    """ "stage2_block1/proj_conv" -> "layer2.0.downsample.0"; stem and head likewise."""
    top = {"stem_conv": "conv1", "stem_norm": "bn1", "head": "fc"}
    if path in top:
        return top[path]
    block, layer = path.split("/")
    stage, index = re.fullmatch(r"stage(\d+)_block(\d+)", block).groups()
    return f"layer{stage}.{int(index) - 1}.{_BLOCK_LAYERS[layer]}"


def _vgg_module(depth: int, batch_norm: bool) -> Callable[[str], str]:
    """cnn_lab's VGG names (Conv_3, BatchNorm_3, Dense_1) -> torchvision's (features.10, ...)."""
    conv_positions, position = [], 0  # Each conv's index in torchvision's `features`.
    for num_convs in VGG_DEPTHS[depth]:
        for _ in range(num_convs):
            conv_positions.append(position)
            position += 3 if batch_norm else 2  # conv, (norm,) relu
        position += 1  # max pool

    def name(path: str) -> str:
        kind, index = path.rsplit("_", 1)
        if kind == "Dense":
            return f"classifier.{3 * int(index)}"  # linear, relu, dropout
        return f"features.{conv_positions[int(index)] + (kind == 'BatchNorm')}"

    return name


def _alexnet_module(path: str) -> str:
    """cnn_lab's AlexNet names (conv1..conv5, Dense_0..2) -> torchvision's."""
    if path.startswith("conv"):
        return f"features.{(0, 3, 6, 8, 10)[int(path[4:]) - 1]}"
    return f"classifier.{(1, 4, 6)[int(path.rsplit('_', 1)[1])]}"


ARCHITECTURES: dict[str, Architecture] = {
    **{
        f"resnet{depth}": Architecture(
            dict(name="resnet", family="imagenet", depth=depth, shortcut="B"), _resnet_module
        )
        for depth in IMAGENET_DEPTHS
    },
    **{
        f"vgg{depth}{'_bn' if batch_norm else ''}": Architecture(
            dict(name="vgg", depth=depth, batch_norm=batch_norm, adaptive_pool=(7, 7)),
            _vgg_module(depth, batch_norm),
            flattened={"Dense_0": (7, 7)},
        )
        for depth in VGG_DEPTHS
        for batch_norm in (False, True)
    },
    "alexnet": Architecture(
        dict(name="alexnet", variant="torchvision"), _alexnet_module, flattened={"Dense_0": (6, 6)}
    ),
}

# timm's names for torchvision's layers where they differ (its VGG head is convolutional).
TIMM_NAMES = {
    "pre_logits.fc1": "classifier.0",
    "pre_logits.fc2": "classifier.3",
    "head.fc": "classifier.6",
}


def get(arch: str) -> Architecture:
    """The architecture called `arch` ("resnet50", "vgg16_bn", "alexnet", ...)."""
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"--arch={arch!r} is not an architecture cnn_lab imports. Known: "
            f"{', '.join(ARCHITECTURES)} (torchvision's names)."
        )
    return ARCHITECTURES[arch]
