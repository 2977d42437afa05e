"""Batch norm whose training-mode gradient is written out, so the step keeps fewer arrays.

Differentiating flax's `nn.BatchNorm` makes XLA keep `x - mean` (one more activation-sized
array per layer, written in the forward pass and read in the backward pass) beside `x`.
`BatchNorm` here computes the same forward pass and recomputes `x - mean` from `x` in its
backward pass, where XLA fuses it into the gradient's other element-wise work.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, mean, var): x (..., C) normalised by its batch statistics over all but the last
    axis, times scale (C,) plus bias (C,), as flax's BatchNorm in training; mean and var (C,)
    (biased, for the running averages) pass no gradient back."""
    return _normalize_forward(x, scale, bias, epsilon)[0]


def _normalize_forward(x, scale, bias, epsilon: float):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    # flax's fast variance: E[x^2] - E[x]^2 in one pass over x.
    var = jnp.maximum(0.0, jnp.mean(lax.square(x), axes) - lax.square(mean))
    inverse = lax.rsqrt(var + epsilon)
    y = (x - _per_channel(mean, x)) * _per_channel(scale * inverse, x) + _per_channel(bias, x)
    return (y, mean, var), (x, mean, inverse, scale)


def _per_channel(v: jax.Array, x: jax.Array) -> jax.Array:
    """v (C,) shaped to broadcast against x (..., C)."""
    return v.reshape((1,) * (x.ndim - 1) + (-1,))


def _normalize_backward(epsilon: float, residuals: tuple, cotangents: tuple) -> tuple:
    del epsilon
    x, mean, inverse, scale = residuals
    dy = cotangents[0]  # The statistics feed only the running averages: no gradient.
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    normalized = (x - _per_channel(mean, x)) * _per_channel(inverse, x)
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * normalized, axes)
    dx = _per_channel(scale * inverse, x) * (
        dy - (_per_channel(dbias, x) + normalized * _per_channel(dscale, x)) / count
    )
    return dx, dscale, dbias


normalize.defvjp(_normalize_forward, _normalize_backward)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same variables, same forward pass) whose float32 training-mode calls
    over the last axis run `normalize`; other calls run flax's."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """x (..., C) normalised; see `nn.BatchNorm.__call__`."""
        running = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        plain = (
            running
            or mask is not None
            or self.axis_name is not None
            or self.axis not in (-1, x.ndim - 1)
            or not (self.use_scale and self.use_bias)
            or x.dtype != jnp.float32
            or jnp.dtype(self.dtype or jnp.float32) != jnp.float32
            or self.is_initializing()
        )
        if plain:
            return super().__call__(x, use_running_average, mask=mask)
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        y, mean, var = normalize(x, scale, bias, self.epsilon)
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y
