"""The classic two-convolution network for 28x28 images (TensorFlow's "Deep MNIST")."""

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
from jax import lax

from cnn_lab.models.layers import Conv, check_removal, get_activation, max_pool


class ConvNet(nn.Module):
    """conv5x5x32 pad 2, maxpool 2, conv5x5x64 pad 2, maxpool 2, fc1024, dropout, fc classes.

    `remove` drops "conv1", "conv2" (each with its activation; the pools stay) or "fc3" (the
    hidden dense layer, with its dropout); the next kept layer takes what the previous one
    gives, and kept layers keep their parameter names.
    """

    # The removable layers, in order; the output layer (fc4) always stays.
    LAYERS: ClassVar[tuple[str, ...]] = ("conv1", "conv2", "fc3")

    num_classes: int
    hidden_size: int = 1024
    dropout_rate: float = 0.5
    activation: str = "relu"
    remove: Sequence[str] = ()  # Names of layers left out (see removable_layers).
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    convolution: Callable = lax.conv_general_dilated  # Set from conv_implementation.

    def removable_layers(self) -> tuple[str, ...]:
        """ "conv1", "conv2" and "fc3"."""
        return self.LAYERS

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        check_removal(self.remove, self.LAYERS, "the ConvNet")
        conv = functools.partial(Conv, dtype=self.dtype, convolution=self.convolution)
        act = get_activation(self.activation)
        for index, (features, name) in enumerate(((32, "conv1"), (64, "conv2"))):
            if name not in self.remove:
                x = act(conv(features, (5, 5), padding=2, name=f"Conv_{index}")(x))
            x = max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))  # (B, 7*7*64) for 28x28 input
        if "fc3" not in self.remove:
            x = act(nn.Dense(self.hidden_size, dtype=self.dtype, name="Dense_0")(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="Dense_1")(x)
