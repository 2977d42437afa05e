"""Dynamic loss scaling for float16 compute: flax's DynamicScale, kept in the TrainState.

float16 has 5 exponent bits: gradients below about 6e-8 flush to zero. The loss is multiplied
by a scale S before differentiation, so the backward pass runs S times larger, and the
gradients are divided by S afterwards (in float32). A step whose gradients overflow (inf or
NaN) changes nothing but its step count, and S halves; after `growth_steps` finite steps in a
row, S doubles. S stays a power of two, so scaling and unscaling are exact.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax.training.dynamic_scale import DynamicScale

# The compute dtypes that need loss scaling (bfloat16 has float32's exponent range).
SCALED_DTYPES = ("float16",)

# fn(*args) -> ((loss, aux), float32 grads, the loss scale after this step, grads finite).
ScaledValueAndGrad = Callable[..., tuple[tuple[jax.Array, Any], Any, Any, jax.Array | None]]


def from_config(compute_dtype: str, train_config: ml_collections.ConfigDict) -> DynamicScale | None:
    """The loss scale a run computing in `compute_dtype` (config.model) starts with, from
    config.train's loss_scale_init and loss_scale_growth_steps; None: no scaling."""
    if compute_dtype not in SCALED_DTYPES:
        return None
    return DynamicScale(
        growth_interval=train_config.loss_scale_growth_steps,
        scale=jnp.float32(train_config.loss_scale_init),
        fin_steps=jnp.int32(0),
    )


def value_and_grad(loss_fn: Callable, loss_scale: DynamicScale | None) -> ScaledValueAndGrad:
    """`jax.value_and_grad(loss_fn, has_aux=True)`, with `loss_scale` applied (None: plain).

    The returned function gives ((loss, aux), grads, loss scale after the step, finite): the
    loss and grads are unscaled; `finite` () bool says whether every gradient is finite (None
    without scaling, where the loss scale after is None too).
    """
    if loss_scale is None:
        plain = jax.value_and_grad(loss_fn, has_aux=True)

        def unscaled(*args):
            value, grads = plain(*args)
            return value, grads, None, None

        return unscaled
    scaled_fn = loss_scale.value_and_grad(loss_fn, has_aux=True)

    def scaled(*args):
        after, finite, value, grads = scaled_fn(*args)
        return value, grads, after, finite

    return scaled


def combine_micro_batches(
    scales_after: DynamicScale | None, finite: jax.Array | None
) -> tuple[DynamicScale | None, jax.Array | None]:
    """The loss scale after a step of k micro-batches, and whether all their grads were finite.

    `scales_after` (leaves stacked over the k micro-batches) and `finite` (k,) are each one's
    result from the same starting scale: the step's result is that of its first micro-batch
    that overflowed, or of any (the first) when none did.
    """
    if scales_after is None:
        return None, None
    first_overflow = jnp.argmin(finite)  # 0 when every micro-batch is finite.
    return jax.tree.map(lambda x: x[first_overflow], scales_after), jnp.all(finite)


def keep_if_finite(finite: jax.Array, updated: dict, previous: dict) -> dict:
    """`updated` where `finite` (a () bool), else `previous`: same trees, chosen leaf by leaf."""
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, previous)
