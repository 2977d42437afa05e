"""Fully connected classifier on flattened images."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from cnn_lab.models.layers import get_activation


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, `hidden_sizes` dense layers, linear head.

    `hidden_sizes=(400, 100, 700)` on 32x32x3 input is the 3072-400-100-700-10 net.
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (256, 128)
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        act = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1))  # (B, H*W*C)
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)
