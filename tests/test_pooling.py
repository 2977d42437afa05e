"""layers.max_pool: nn.max_pool's values and gradients, through a faster gradient where it tiles."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab.models.layers import max_pool

# (B, H, W, C) inputs of the zoo's 2x2/2 pools: LeNet-5 on 28x28 and 32x32, ConvNet, VGG on 32x32.
TILED = [
    (2, 24, 24, 6),
    (2, 8, 8, 16),
    (2, 28, 28, 6),
    (2, 10, 10, 16),
    (2, 28, 28, 32),
    (2, 14, 14, 64),
    (2, 32, 32, 64),
    (2, 2, 2, 512),
]
# AlexNet's overlapping 3x3/2 pools (both paddings) and an odd size: nn.max_pool runs them.
NOT_TILED = [
    ((2, 27, 27, 8), (3, 3), (2, 2), "VALID"),
    ((2, 16, 16, 8), (3, 3), (2, 2), "SAME"),
    ((2, 15, 15, 8), (2, 2), (2, 2), "VALID"),
]


def relu_like(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    """Activations with many ties inside windows (zeros and repeated values), as after ReLU."""
    x = jax.random.normal(jax.random.key(seed), shape)
    return jnp.where(x < 0, 0.0, jnp.round(2 * x) / 2)


def value_and_grad(pool, x: jax.Array, window, strides, padding) -> tuple[jax.Array, jax.Array]:
    """The pool's output and the gradient of a random projection of it, w.r.t. x."""
    out = pool(x, window, strides=strides, padding=padding)
    weights = jax.random.normal(jax.random.key(1), out.shape)
    grad = jax.grad(
        lambda x: jnp.sum(
            pool(x, window, strides=strides, padding=padding).astype(jnp.float32) * weights
        )
    )
    return out, jax.jit(grad)(x)


@pytest.mark.parametrize("shape", TILED)
def test_tiled_pool_equals_flax_in_value_and_gradient_ties_included(shape):
    x = relu_like(shape)
    ours = value_and_grad(max_pool, x, (2, 2), (2, 2), "VALID")
    flax = value_and_grad(nn.max_pool, x, (2, 2), (2, 2), "VALID")
    np.testing.assert_array_equal(ours[0], flax[0])
    np.testing.assert_array_equal(ours[1], flax[1])  # each window's first maximum, exactly


@pytest.mark.parametrize("shape", TILED)
def test_tiled_pool_gradient_avoids_select_and_scatter(shape):
    """The speed-up is the point: a silent fall-back to nn.max_pool would fail here."""
    grad = jax.grad(lambda x: jnp.sum(max_pool(x, (2, 2), strides=(2, 2))))
    jaxpr = str(jax.make_jaxpr(grad)(jnp.zeros(shape)))
    assert "reduce_window" not in jaxpr and "select_and" not in jaxpr


@pytest.mark.parametrize("shape, window, strides, padding", NOT_TILED)
def test_other_pools_are_flax_max_pool(shape, window, strides, padding):
    x = relu_like(shape)
    ours = value_and_grad(max_pool, x, window, strides, padding)
    flax = value_and_grad(nn.max_pool, x, window, strides, padding)
    np.testing.assert_array_equal(ours[0], flax[0])
    np.testing.assert_array_equal(ours[1], flax[1])


def test_tiled_pool_takes_explicit_zero_padding_and_bfloat16():
    x = relu_like((2, 8, 8, 4)).astype(jnp.bfloat16)
    ours = value_and_grad(max_pool, x, (2, 2), (2, 2), ((0, 0), (0, 0)))
    flax = value_and_grad(nn.max_pool, x, (2, 2), (2, 2), "VALID")
    assert ours[0].dtype == ours[1].dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours[0], flax[0])
    np.testing.assert_array_equal(ours[1], flax[1])
