"""The CPU convolutions compute their input's gradient only when something differentiates it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cnn_lab.kernels import build, stand_ins

pytestmark = pytest.mark.skipif(
    build.problem() is not None, reason=f"no oneDNN here: {build.problem()}"
)
PADDING = ((2, 2), (2, 2))


def conv_loss(fn):
    """A scalar of the convolution of x (B, H, W, C) with kernel (KH, KW, C, O)."""

    def loss(x: jax.Array, kernel: jax.Array) -> jax.Array:
        y = fn(x, kernel, (1, 1), PADDING, dimension_numbers=stand_ins.NHWC)
        return jnp.sum(jnp.sin(y))

    return loss


def inputs() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 3)), jnp.float32)
    return x, jnp.asarray(rng.normal(size=(5, 5, 3, 8)), jnp.float32)


def test_kernel_only_gradient_skips_the_input_gradient_and_matches_xla():
    x, kernel = inputs()
    grad = jax.jit(jax.grad(conv_loss(stand_ins.onednn_conv_general_dilated), argnums=1))
    hlo = grad.lower(x, kernel).as_text()
    assert "cnn_lab_onednn_conv_kernel_backward" in hlo
    assert "cnn_lab_onednn_conv_backward" not in hlo  # The (dx, dkernel) call.
    expected = jax.grad(conv_loss(lax.conv_general_dilated), argnums=1)(x, kernel)
    np.testing.assert_allclose(grad(x, kernel), expected, rtol=1e-4, atol=1e-4)


def test_both_gradients_when_the_input_is_differentiated():
    x, kernel = inputs()
    grad = jax.jit(jax.grad(conv_loss(stand_ins.onednn_conv_general_dilated), argnums=(0, 1)))
    assert "cnn_lab_onednn_conv_backward" in grad.lower(x, kernel).as_text()
    expected = jax.grad(conv_loss(lax.conv_general_dilated), argnums=(0, 1))(x, kernel)
    for got, want in zip(grad(x, kernel), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argnums, forward_calls", [(1, 1), ((0, 1), 2)])
def test_batch_minor_computes_the_input_gradient_only_when_asked(argnums, forward_calls):
    # Its input gradient is a second forward call (dy with the flipped kernel).
    x, kernel = inputs()
    x = jnp.tile(x, (8, 1, 1, 1))  # 16 images: one lane vector.
    grad = jax.jit(jax.grad(conv_loss(stand_ins.batch_minor_conv_general_dilated), argnums=argnums))
    hlo = grad.lower(x, kernel).as_text()
    assert hlo.count("@cnn_lab_batch_minor_conv_forward(") == forward_calls
    assert "cnn_lab_batch_minor_conv_kernel_backward" in hlo
    expected = jax.grad(conv_loss(lax.conv_general_dilated), argnums=argnums)(x, kernel)
    chex.assert_trees_all_close(grad(x, kernel), expected, rtol=1e-4, atol=1e-4)


def test_a_second_layer_still_gets_its_input_gradient():
    # Only the first convolution's input is constant; the second's comes from the first.
    x, kernel = inputs()
    second = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5, 8, 4)), jnp.float32)

    def two_layers(fn):
        def loss(k1: jax.Array, k2: jax.Array) -> jax.Array:
            h = jnp.tanh(fn(x, k1, (1, 1), PADDING, dimension_numbers=stand_ins.NHWC))
            return jnp.sum(jnp.sin(fn(h, k2, (1, 1), PADDING, dimension_numbers=stand_ins.NHWC)))

        return jax.grad(loss, argnums=(0, 1))

    got = jax.jit(two_layers(stand_ins.onednn_conv_general_dilated))(kernel, second)
    want = two_layers(lax.conv_general_dilated)(kernel, second)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
