"""The classic two-convolution network for 28x28 images (TensorFlow's "Deep MNIST")."""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax import lax

from cnn_lab.models.layers import Conv, get_activation, max_pool


class ConvNet(nn.Module):
    """conv5x5x32 pad 2, maxpool 2, conv5x5x64 pad 2, maxpool 2, fc1024, dropout, fc classes."""

    num_classes: int
    hidden_size: int = 1024
    dropout_rate: float = 0.5
    activation: str = "relu"
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    convolution: Callable = lax.conv_general_dilated  # Set from conv_implementation.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        conv = functools.partial(Conv, dtype=self.dtype, convolution=self.convolution)
        act = get_activation(self.activation)
        x = max_pool(act(conv(32, (5, 5), padding=2)(x)), (2, 2), strides=(2, 2))
        x = max_pool(act(conv(64, (5, 5), padding=2)(x)), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # (B, 7*7*64) for 28x28 input
        x = act(nn.Dense(self.hidden_size, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
