"""AlexNet: Krizhevsky et al.'s single-tower ImageNet layout and Zhang et al.'s small CIFAR one."""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_lab.models.layers import (
    Conv,
    adaptive_avg_pool,
    at_least_float32,
    check_removal,
    conv_kernel_init,
    dense_names,
    get_activation,
)


class Layout(NamedTuple):
    convs: tuple[tuple[int, int, int, int], ...]  # (features, kernel, stride, padding) each
    pooled: tuple[int, ...]  # indices of the convs followed by max pool 3x3/2
    pool_padding: str
    hidden_sizes: tuple[int, ...]
    lrn: tuple[int, float, float, float]  # (size, k, alpha, beta) after the first two convs
    lrn_before_pool: bool
    adaptive_pool: tuple[int, int] | None = None  # Average the last map to this size.


VARIANTS: dict[str, Layout] = {
    # Section 3.5 of Krizhevsky et al. (2012), both GPUs' halves merged; 227x227 input.
    "imagenet": Layout(
        convs=((96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)),
        pooled=(0, 1, 4),
        pool_padding="VALID",
        hidden_sizes=(4096, 4096),
        lrn=(5, 2.0, 1e-4, 0.75),
        lrn_before_pool=True,
    ),
    # torchvision's alexnet: Krizhevsky (2014), "One weird trick for parallelizing
    # convolutional neural networks", 64 first filters, no response normalisation, the last
    # map averaged to 6x6 (any input size); 224x224 input.
    "torchvision": Layout(
        convs=((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)),
        pooled=(0, 1, 4),
        pool_padding="VALID",
        hidden_sizes=(4096, 4096),
        lrn=(5, 2.0, 1e-4, 0.75),
        lrn_before_pool=True,
        adaptive_pool=(6, 6),
    ),
    # Appendix A of Zhang et al. (2017), from TensorFlow's CIFAR-10 tutorial; 28x28 or 32x32 input.
    "cifar": Layout(
        convs=((64, 5, 1, 2), (64, 5, 1, 2)),
        pooled=(0, 1),
        pool_padding="SAME",
        hidden_sizes=(384, 192),
        lrn=(9, 1.0, 1e-3 / 9, 0.75),
        lrn_before_pool=False,
    ),
    # The ImageNet net's five convs and two hidden dense layers for 28x28 or 32x32 input: half
    # the widths of torchvision's (Krizhevsky 2014), stride 1, "SAME" pools (32->16->8->4).
    "compact": Layout(
        convs=((32, 5, 1, 2), (96, 5, 1, 2), (192, 3, 1, 1), (128, 3, 1, 1), (128, 3, 1, 1)),
        pooled=(0, 1, 4),
        pool_padding="SAME",
        hidden_sizes=(1024, 1024),
        lrn=(5, 2.0, 1e-4, 0.75),
        lrn_before_pool=True,
    ),
}


def local_response_norm(x: jax.Array, size: int, k: float, alpha: float, beta: float) -> jax.Array:
    """x / (k + alpha * sum of x^2 over `size` neighbouring channels)^beta, x (B, H, W, C).

    Section 3.3 of Krizhevsky et al. (2012); alpha is not divided by `size` as PyTorch's is.
    """
    half = size // 2
    # In float32 at least: a bfloat16 sum of squares raised to -beta is too coarse.
    wide = at_least_float32(x)
    summed = jax.lax.reduce_window(
        jnp.square(wide),
        np.zeros((), wide.dtype),  # A constant zero: JAX then sums (differentiably).
        jax.lax.add,
        (1, 1, 1, size),
        (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, half)),
    )
    return (wide / (k + alpha * summed) ** beta).astype(x.dtype)


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al., 2012, "ImageNet classification with deep convolutional neural networks").

    variant="imagenet": the paper's net on one tower: conv 96 11x11/4 (55x55x96 at 227x227),
    max pool 3x3/2 (overlapping), conv 256 5x5, pool, conv 384, 384, 256 3x3, pool (6x6x256),
    fc 4096, fc 4096, fc classes, with dropout after both hidden layers: 62,378,344 parameters
    for 1000 classes. The paper's two-GPU net splits conv2, conv4 and conv5 into two groups;
    torchvision's alexnet is Krizhevsky's 2014 "one weird trick" variant (64 channels first).

    variant="torchvision": that variant, torchvision's layout and 61,100,840 parameters (for
    importing its weights). torchvision applies dropout before the two hidden dense layers,
    this module after them: the same network in evaluation, a slightly different one to train.

    variant="cifar": the small AlexNet of Zhang et al. (2017), "Understanding deep learning
    requires rethinking generalization": two (conv 64 5x5, max pool 3x3/2) modules, fc 384,
    fc 192, fc classes; 1,387,786 parameters at 28x28 and 10 classes. Zhang et al. used local
    response normalisation and no dropout (`local_response_norm=True, dropout_rate=0.0`).

    variant="compact": the ImageNet layout (conv1-5, fc6, fc7, fc8) scaled for 32x32 input: conv
    32 5x5, pool, conv 96 5x5, pool, conv 192, 128, 128 3x3, pool (4x4x128), fc 1024, fc 1024,
    fc classes; 3,770,730 parameters at 32x32 grey and 10 classes. Like the ImageNet net, most
    parameters sit in fc6 and fc7, so the lectures' layer-removal ablation keeps its shape.

    `local_response_norm` adds the variant's response normalisation after its first two convs.
    The first dense layer's size follows the flattened final map, so any input size works.

    `remove` drops named layers ("conv3", "fc7"; `removable_layers()` lists them; the output
    layer stays), the lectures' "depth matters" ablation: a removed conv takes its activation
    and response normalisation with it, a removed dense layer its dropout; the max pools stay,
    so the maps keep their sizes, and the next layer takes what the previous kept one gives.
    Parameter names do not shift: the kept layers are named as in the full net.
    """

    num_classes: int
    variant: str = "imagenet"
    dropout_rate: float = 0.5
    local_response_norm: bool = False
    activation: str = "relu"
    remove: Sequence[str] = ()  # Names of layers left out (see removable_layers).
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    convolution: Callable = lax.conv_general_dilated  # Set from conv_implementation.

    def layout(self) -> Layout:
        """The variant's layout; ValueError naming the known variants for an unknown one."""
        if self.variant not in VARIANTS:
            raise ValueError(
                f"Unknown AlexNet variant {self.variant!r}. Known variants: "
                f"{', '.join(VARIANTS)}. Set config.model.variant to one of them."
            )
        return VARIANTS[self.variant]

    def removable_layers(self) -> tuple[str, ...]:
        """ "conv1".."convN", then the hidden dense layers numbered on ("fc6", "fc7")."""
        convs = len(self.layout().convs)
        names = tuple(f"conv{i + 1}" for i in range(convs))
        return names + dense_names(convs + 1, len(self.layout().hidden_sizes))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        layout = self.layout()
        removable = self.removable_layers()
        check_removal(self.remove, removable, f"AlexNet (variant {self.variant!r})")
        act = get_activation(self.activation)
        for i, (features, kernel, stride, padding) in enumerate(layout.convs):
            kept = removable[i] not in self.remove
            if kept:
                x = act(self._conv(features, kernel, stride, padding, removable[i])(x))
            normed = kept and self.local_response_norm and i < 2
            if normed and layout.lrn_before_pool:
                x = local_response_norm(x, *layout.lrn)
            if i in layout.pooled:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=layout.pool_padding)
            if normed and not layout.lrn_before_pool:
                x = local_response_norm(x, *layout.lrn)
        if layout.adaptive_pool is not None:
            x = adaptive_avg_pool(x, layout.adaptive_pool)
        x = x.reshape((x.shape[0], -1))  # (B, 6*6*256) for 227x227 input
        hidden_names = removable[len(layout.convs) :]
        for j, (hidden, name) in enumerate(zip(layout.hidden_sizes, hidden_names, strict=True)):
            if name not in self.remove:
                # Named as in the full net: removing fc6 leaves fc7's parameters at Dense_1.
                x = act(nn.Dense(hidden, dtype=self.dtype, name=f"Dense_{j}")(x))
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        output = f"Dense_{len(layout.hidden_sizes)}"
        return nn.Dense(self.num_classes, dtype=self.dtype, name=output)(x)

    def _conv(self, features: int, kernel: int, stride: int, padding: int, name: str) -> Conv:
        return Conv(
            features,
            (kernel, kernel),
            stride,
            padding=padding,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            convolution=self.convolution,
            name=name,
        )
