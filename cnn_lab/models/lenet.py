"""LeNet-5 (LeCun et al., 1998, "Gradient-based learning applied to document recognition")."""

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
from jax import lax

from cnn_lab.models.layers import Conv, get_activation, get_pooling


class LeNet5(nn.Module):
    """conv5x5x6, pool, conv5x5x16, pool, fc120, fc84, fc classes.

    The 1998 net used tanh and average pooling (`activation="tanh", pooling="avg"`);
    relu and max pooling train faster and are the default. Designed for 32x32 input;
    28x28 works too (the flattened feature map is then 4x4x16 instead of 5x5x16).
    """

    # Every convolution has at most 16 channels: on a CPU run, conv_implementation
    # "auto" picks the batch-minor kernels, which fill the vector lanes with images.
    few_channel_convolutions: ClassVar[bool] = True

    num_classes: int
    activation: str = "relu"
    pooling: str = "max"
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    convolution: Callable = lax.conv_general_dilated  # Set from conv_implementation.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        del train  # LeNet-5 behaves the same in training and evaluation.
        conv = functools.partial(Conv, dtype=self.dtype, convolution=self.convolution)
        act, pool = get_activation(self.activation), get_pooling(self.pooling)
        x = pool(act(conv(6, (5, 5), padding="VALID")(x)), (2, 2), strides=(2, 2))
        x = pool(act(conv(16, (5, 5), padding="VALID")(x)), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # (B, 5*5*16) for 32x32 input
        x = act(nn.Dense(120, dtype=self.dtype)(x))
        x = act(nn.Dense(84, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
