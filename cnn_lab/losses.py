"""Classification loss and accuracy, per example, in plain jax.numpy."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax cross-entropy (B,) of logits (B, K) against int labels (B,) or float targets (B, K).

    Float targets are one-hot or soft (mixup, cutmix); smoothing makes them
    (1 - label_smoothing) * targets + label_smoothing / K either way.
    """
    if jnp.issubdtype(labels.dtype, jnp.integer):
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    else:
        targets = labels.astype(logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int = 1) -> jax.Array:
    """Whether the label is among the k largest logits: (B,) bool for logits (B, K), labels (B,)."""
    if k == 1:
        return jnp.argmax(logits, axis=-1) == labels
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # Ties count against the label, so a constant prediction is never "correct".
    return jnp.sum(logits >= label_logit, axis=-1) <= k
