"""cnn_lab's BatchNorm equals flax's: variables, forward pass, running averages, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab.models.batch_norm import BatchNorm


def _loss_and_grads(cls, x, use_running_average=False, dtype=None):
    """Loss, new batch stats and gradients (params, x) of a BatchNorm of class `cls`."""
    layer = cls(use_running_average=use_running_average, momentum=0.9, epsilon=1e-5, dtype=dtype)
    with jax.numpy_dtype_promotion("standard"):
        variables = layer.init(jax.random.PRNGKey(0), x)
    channels = x.shape[-1]
    params = {"scale": jnp.linspace(0.5, 2.0, channels), "bias": jnp.linspace(-1.0, 1.0, channels)}
    weights = (1,) * (x.ndim - 1) + (channels,)
    stats = {"mean": jnp.linspace(-0.2, 0.2, channels), "var": jnp.linspace(0.5, 1.5, channels)}

    def loss(params, x):
        y, new = layer.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        # Weights per channel, so each channel's gradient differs from its mean.
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * jnp.arange(channels).reshape(weights)), new

    with jax.numpy_dtype_promotion("standard"):  # flax's promotes bfloat16 with float32.
        (value, new), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, x
        )
    return variables, value, new, grads


@pytest.mark.parametrize("shape", [(8, 5, 5, 7), (4, 3, 3, 64), (6, 16)])
def test_training_mode_equals_flax(shape):
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), shape) + 1.0
    ours = _loss_and_grads(BatchNorm, x)
    flax_ = _loss_and_grads(nn.BatchNorm, x)
    # Same variable tree, so checkpoints and imported weights load either way.
    assert jax.tree.structure(ours[0]) == jax.tree.structure(flax_[0])
    np.testing.assert_allclose(ours[1], flax_[1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ours[2:]), jax.tree.leaves(flax_[2:]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_training_mode_runs_normalize():
    """The training-mode call runs `normalize`, whose gradient keeps no `x - mean`."""
    x = jnp.ones((4, 2, 2, 3))
    layer = BatchNorm(use_running_average=False)
    variables = layer.init(jax.random.PRNGKey(0), x)
    jaxpr = jax.make_jaxpr(lambda x: layer.apply(variables, x, mutable=["batch_stats"])[0])(x)
    assert "name=normalize" in str(jaxpr)


@pytest.mark.parametrize(("use_running_average", "dtype"), [(True, None), (False, jnp.bfloat16)])
def test_other_calls_are_flax(use_running_average, dtype):
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 3, 8))
    ours = _loss_and_grads(BatchNorm, x, use_running_average, dtype)
    flax_ = _loss_and_grads(nn.BatchNorm, x, use_running_average, dtype)
    for a, b in zip(jax.tree.leaves(ours[1:]), jax.tree.leaves(flax_[1:]), strict=True):
        np.testing.assert_array_equal(a, b)
