"""VGG networks, configurations A, B, D and E, with or without BatchNorm."""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax

from cnn_lab.models.layers import (
    Conv,
    adaptive_avg_pool,
    check_removal,
    conv_kernel_init,
    dense_names,
    get_activation,
    max_pool,
    standard_promotion,
)

# depth -> 3x3 convs in each of the five stages (Table 1 of the paper: A=11, B=13, D=16, E=19).
DEPTHS: dict[int, tuple[int, ...]] = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
STAGE_WIDTHS = (64, 128, 256, 512, 512)


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman, 2014, "Very deep convolutional networks for large-scale image recognition").

    Five stages of 3x3 convs (padding 1), each followed by max pool 2x2/2, then the flattened
    map (7x7x512 at 224x224) goes through dense layers of `hidden_sizes`, each followed by
    act and dropout, and a dense layer to the classes. The default is the paper's ImageNet
    head (4096, 4096) with dropout 0.5; VGG-16 then has torchvision's 138,357,544 parameters.
    `batch_norm=True` inserts BatchNorm after every conv (torchvision's vgg*_bn; Ioffe &
    Szegedy 2015), keeping the conv biases as torchvision does.

    CIFAR (32x32 input, so the map is 1x1x512): `hidden_sizes=()` gives the head of
    kuangliu/pytorch-cifar, a single dense layer from the 512 features to the classes
    (VGG-16-BN: 14,728,266 parameters for 10 classes); `hidden_sizes=(512, 512)` has the sizes
    of chengyangfu/pytorch-vgg-cifar10's head. Any input of at least 32x32 works; the first dense
    layer's size follows the final map's, unless `adaptive_pool` (torchvision's (7, 7)) averages
    the map to that size first, as torchvision's VGG does.

    `widths` sets the five stages' channels: (32, 64, 128, 256, 256), half the paper's, gives
    a net a quarter the cost for small grey images.

    `remove` drops named layers: convs "conv<stage>_<k>" ("conv3_2": stage 3's second conv,
    with its BatchNorm and activation), hidden dense layers "fc6", "fc7" (with their dropout);
    the output layer and the max pools stay, and the next kept layer takes what the previous
    one gives. The kept layers keep their full-net parameter names (Conv_7 stays Conv_7).
    """

    num_classes: int
    depth: int = 16
    batch_norm: bool = False
    widths: Sequence[int] = STAGE_WIDTHS  # Channels of the five stages (the paper's default).
    hidden_sizes: Sequence[int] = (4096, 4096)
    dropout_rate: float = 0.5
    adaptive_pool: Sequence[int] | None = None
    activation: str = "relu"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    remove: Sequence[str] = ()  # Names of layers left out (see removable_layers).
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    convolution: Callable = lax.conv_general_dilated  # Set from conv_implementation.

    def stages(self) -> tuple[int, ...]:
        """3x3 convs in each stage; ValueError naming the known depths for another depth."""
        if self.depth not in DEPTHS:
            raise ValueError(
                f"VGG depth {self.depth} is not one of {', '.join(map(str, DEPTHS))}; "
                "change config.model.depth."
            )
        return DEPTHS[self.depth]

    def removable_layers(self) -> tuple[str, ...]:
        """ "conv1_1".."conv5_<n>" stage by stage, then the hidden dense layers ("fc6", "fc7")."""
        convs = tuple(
            f"conv{stage + 1}_{k + 1}" for stage, n in enumerate(self.stages()) for k in range(n)
        )
        return convs + dense_names(len(STAGE_WIDTHS) + 1, len(self.hidden_sizes))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        removable = self.removable_layers()
        check_removal(self.remove, removable, f"VGG-{self.depth}")
        act = get_activation(self.activation)
        index = 0  # Of the conv in the full net: names its parameters.
        for num_convs, width in zip(self.stages(), self.widths, strict=True):
            for _ in range(num_convs):
                if removable[index] not in self.remove:
                    x = Conv(
                        width,
                        (3, 3),
                        padding=1,
                        kernel_init=conv_kernel_init,
                        dtype=self.dtype,
                        convolution=self.convolution,
                        name=f"Conv_{index}",
                    )(x)
                    if self.batch_norm:
                        x = standard_promotion(nn.BatchNorm)(
                            use_running_average=not train,
                            momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon,
                            dtype=self.dtype,
                            name=f"BatchNorm_{index}",
                        )(x)
                    x = act(x)
                index += 1
            x = max_pool(x, (2, 2), strides=(2, 2))
        if self.adaptive_pool is not None:
            x = adaptive_avg_pool(x, self.adaptive_pool)
        x = x.reshape((x.shape[0], -1))  # (B, 7*7*512) for 224x224 input
        for j, hidden in enumerate(self.hidden_sizes):
            if removable[index + j] not in self.remove:
                x = act(nn.Dense(hidden, dtype=self.dtype, name=f"Dense_{j}")(x))
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        output = f"Dense_{len(self.hidden_sizes)}"
        return nn.Dense(self.num_classes, dtype=self.dtype, name=output)(x)
