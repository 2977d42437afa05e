"""Residual networks for ImageNet and CIFAR, post- or pre-activation, with stochastic depth."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab.models.layers import (
    StochasticDepth,
    conv_kernel_init,
    get_activation,
    linear_drop_rates,
    standard_promotion,
)

ModuleDef = Any

# depth -> (bottleneck blocks?, blocks per stage), from Table 1 of He et al. (2016).
IMAGENET_DEPTHS: dict[int, tuple[bool, tuple[int, ...]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
FAMILIES = ("imagenet", "cifar")
SHORTCUTS = ("A", "B", "C")


def conv_and_norm(module: nn.Module, train: bool) -> tuple[ModuleDef, ModuleDef]:
    """A ResNet's layer makers, from `module`'s dtype, convolution, bn_momentum and
    bn_epsilon: bias-free He-initialised convs, and batch norm (batch statistics if `train`)."""
    conv = functools.partial(
        nn.Conv,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=module.dtype,
        conv_general_dilated=module.convolution,
    )
    norm = functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        dtype=module.dtype,
    )
    return conv, standard_promotion(norm)


class ResidualBlock(nn.Module):
    """One residual unit: a basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4) branch plus shortcut.

    Post-activation (2015): out = act(shortcut(x) + branch(x)), each conv followed by norm.
    Pre-activation (2016, "Identity mappings"): out = shortcut(x) + branch(x), each conv
    preceded by norm and act; a projection shortcut reads the pre-activated input, as in the
    paper's code. The stride sits on the 3x3 conv of a bottleneck (torchvision's "v1.5"),
    which has the same parameters as the paper's strided 1x1 and is slightly more accurate.
    """

    filters: int
    strides: int
    bottleneck: bool
    shortcut: str
    preactivation: bool
    zero_init_last: bool
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]
    drop_path: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x (B, H, W, C) -> (B, H / strides, W / strides, filters or 4 * filters)."""
        if self.bottleneck:
            convs = [
                (self.filters, 1, 1),
                (self.filters, 3, self.strides),
                (4 * self.filters, 1, 1),
            ]
        else:
            convs = [(self.filters, 3, self.strides), (self.filters, 3, 1)]
        features = convs[-1][0]
        reshaped = self.strides != 1 or x.shape[-1] != features
        project = self.shortcut == "C" or (self.shortcut == "B" and reshaped)

        y = x
        if self.preactivation:
            y = self.act(self.norm()(x))
            if project:
                x = y
        residual = x
        if project:
            residual = self.conv(features, (1, 1), self.strides, name="proj_conv")(residual)
            if not self.preactivation:
                residual = self.norm(name="proj_norm")(residual)
        elif reshaped:
            # Option A: parameter-free, subsample then zero-pad the new channels.
            residual = residual[:, :: self.strides, :: self.strides, :]
            pad = features - residual.shape[-1]
            residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (0, pad)))

        # Zeroing the branch's last scale makes each block start as the identity (Goyal et al.,
        # 2017); a pre-activation branch ends in a conv, so that conv's kernel is zeroed instead.
        zero = nn.initializers.zeros
        for i, (width, kernel, strides) in enumerate(convs):
            last = i == len(convs) - 1
            if self.preactivation and i > 0:
                y = self.act(self.norm()(y))
            conv = self.conv
            if last and self.zero_init_last and self.preactivation:
                conv = functools.partial(conv, kernel_init=zero)
            y = conv(width, (kernel, kernel), strides, padding=kernel // 2)(y)
            if not self.preactivation:
                scale_init = zero if last and self.zero_init_last else nn.initializers.ones
                y = self.norm(scale_init=scale_init)(y)
                if not last:
                    y = self.act(y)
        y = self.drop_path()(y, train=train)
        return residual + y if self.preactivation else self.act(residual + y)


def layout(family: str, depth: int, width: float) -> tuple[bool, tuple[int, ...], int]:
    """(bottleneck blocks?, blocks per stage, stem width) of a ResNet `family` at `depth`,
    channel counts multiplied by `width`."""
    if family == "imagenet":
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(
                f"ImageNet ResNet depth {depth} is not one of "
                f"{', '.join(map(str, IMAGENET_DEPTHS))}; change config.model.depth."
            )
        bottleneck, stage_sizes = IMAGENET_DEPTHS[depth]
        return bottleneck, stage_sizes, round(64 * width)
    if family == "cifar":
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}; "
                "change config.model.depth."
            )
        return False, (((depth - 2) // 6),) * 3, round(16 * width)
    raise ValueError(
        f"Unknown ResNet family {family!r}. Known families: {', '.join(FAMILIES)}. "
        "Set config.model.family to one of them."
    )


def stem(
    x: jax.Array,
    features: int,
    *,
    family: str,
    preactivation: bool,
    conv: ModuleDef,
    norm: ModuleDef,
    act: Callable[[jax.Array], jax.Array],
) -> jax.Array:
    """The stem of the calling module, as `stem_conv` (and `stem_norm` unless `preactivation`).

    x (B, H, W, C) -> (B, H / 4, W / 4, features) for "imagenet" (conv 7x7/2, max pool 3x3/2),
    (B, H, W, features) for "cifar" (conv 3x3).
    """
    if family == "imagenet":
        x = conv(features, (7, 7), 2, padding=3, name="stem_conv")(x)  # (B, H/2, W/2, 64)
    else:
        x = conv(features, (3, 3), 1, padding=1, name="stem_conv")(x)  # (B, H, W, 16)
    if not preactivation:
        x = act(norm(name="stem_norm")(x))
    if family == "imagenet":
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # (B, H/4, W/4, 64)
    return x


def residual_stage(
    x: jax.Array,
    stage: int,
    filters: int,
    block: ModuleDef,
    drop_paths: Sequence[ModuleDef],
    *,
    train: bool,
) -> jax.Array:
    """Stage `stage` (1-based) of the calling module: one `block` per entry of `drop_paths`,
    named `stage<stage>_block<i>`; the first block of every stage after the first has stride 2.

    `block` is a ResidualBlock partial lacking filters, strides and drop_path.
    x (B, H, W, C) -> (B, H', W', filters or 4 * filters).
    """
    for i, drop_path in enumerate(drop_paths):
        x = block(
            filters=filters,
            strides=2 if stage > 1 and i == 0 else 1,
            drop_path=drop_path,
            name=f"stage{stage}_block{i + 1}",
        )(x, train=train)
    return x


def head(x: jax.Array, num_classes: int, dtype: Any) -> jax.Array:
    """Global average pooling and the calling module's dense layer `head`: features
    (B, H, W, C) -> logits (B, num_classes)."""
    x = jnp.mean(x, axis=(1, 2))  # (B, C)
    return nn.Dense(num_classes, dtype=dtype, name="head")(x)


class ResNet(nn.Module):
    """ResNet (He et al., 2016, "Deep residual learning for image recognition").

    family="imagenet": depth 18/34 (basic blocks) or 50/101/152 (bottlenecks), stem conv 7x7/2
    with 64 channels and max pool 3x3/2, stages of 64/128/256/512 (x4 for bottlenecks) channels;
    ResNet-50 at 224x224 ends in a 7x7x2048 map. family="cifar": depth 6n+2 (20, 32, 44, 56,
    110, 1202), stem conv 3x3 with 16 channels, three stages of n basic blocks with 16/32/64
    channels. Both end in global average pooling and one dense layer; any input size works.

    Shortcuts when a block changes shape (paper, section 4.1): "A" subsamples and zero-pads
    (no parameters), "B" projects with a 1x1 conv, "C" projects in every block. The default
    (None) is the paper's choice per family: A for CIFAR (0.27M params for ResNet-20, as
    the paper reports), B for ImageNet (torchvision's counts).

    preactivation=True gives He et al. (2016), "Identity mappings in deep residual networks":
    the stem is a bare conv (plus max pool for ImageNet) and a final norm and act follow
    the last block, as in Keras' ResNetV2. `width` multiplies every channel count.
    `stochastic_depth_rate` is the drop probability of the last block (Huang et al., 2016);
    earlier blocks follow the linear rule of `layers.linear_drop_rates`. BatchNorm `momentum`
    is flax's (weight of the old running average), so 0.9 equals PyTorch's momentum=0.1.
    """

    num_classes: int
    depth: int = 18
    family: str = "imagenet"
    shortcut: str | None = None
    preactivation: bool = False
    zero_init_residual: bool = False
    width: float = 1.0
    activation: str = "relu"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    stochastic_depth_rate: float = 0.0
    stochastic_depth_mode: str = "batch"
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    convolution: Callable = lax.conv_general_dilated  # Set from conv_implementation.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        bottleneck, stage_sizes, stem_width = layout(self.family, self.depth, self.width)
        shortcut = self.shortcut or ("A" if self.family == "cifar" else "B")
        if shortcut not in SHORTCUTS:
            raise ValueError(
                f"Unknown shortcut {shortcut!r}. Known shortcuts: {', '.join(SHORTCUTS)} "
                "(or None for the family's default). Set config.model.shortcut to one of them."
            )
        act = get_activation(self.activation)
        conv, norm = conv_and_norm(self, train)
        x = stem(
            x,
            stem_width,
            family=self.family,
            preactivation=self.preactivation,
            conv=conv,
            norm=norm,
            act=act,
        )
        block = functools.partial(
            ResidualBlock,
            bottleneck=bottleneck,
            shortcut=shortcut,
            preactivation=self.preactivation,
            zero_init_last=self.zero_init_residual,
            conv=conv,
            norm=norm,
            act=act,
        )
        drop_rates = iter(linear_drop_rates(self.stochastic_depth_rate, sum(stage_sizes)))
        for stage, num_blocks in enumerate(stage_sizes, start=1):
            drop_paths = [
                functools.partial(StochasticDepth, next(drop_rates), self.stochastic_depth_mode)
                for _ in range(num_blocks)
            ]
            x = residual_stage(
                x, stage, stem_width * 2 ** (stage - 1), block, drop_paths, train=train
            )
        if self.preactivation:
            x = act(norm(name="final_norm")(x))
        return head(x, self.num_classes, self.dtype)
