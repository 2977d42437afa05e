"""Fully connected classifier on flattened images."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from cnn_lab.models.layers import check_removal, dense_names, get_activation


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, `hidden_sizes` dense layers, linear head.

    `hidden_sizes=(400, 100, 700)` on 32x32x3 input is the 3072-400-100-700-10 net.
    `remove` drops hidden layers by name ("fc1" is the first; the output layer stays), the
    next kept layer taking what the previous one gives; kept layers keep their parameter names.
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (256, 128)
    activation: str = "relu"
    dropout_rate: float = 0.0
    remove: Sequence[str] = ()  # Names of hidden layers left out (see removable_layers).
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.

    def removable_layers(self) -> tuple[str, ...]:
        """The hidden layers "fc1".."fc<len(hidden_sizes)>"."""
        return dense_names(1, len(self.hidden_sizes))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        removable = self.removable_layers()
        check_removal(self.remove, removable, "the MLP")
        act = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1))  # (B, H*W*C)
        for j, (width, name) in enumerate(zip(self.hidden_sizes, removable, strict=True)):
            if name not in self.remove:
                x = act(nn.Dense(width, dtype=self.dtype, name=f"Dense_{j}")(x))
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        output = f"Dense_{len(self.hidden_sizes)}"
        return nn.Dense(self.num_classes, dtype=self.dtype, name=output)(x)
