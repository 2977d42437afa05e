"""Stochastic depth: the linear rule, inverted scaling, batch vs sample dropping, rate 0."""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab.models.layers import StochasticDepth, linear_drop_rates
from cnn_lab.models.resnet import ResidualBlock, ResNet


def key(seed: int) -> jax.Array:
    """An "rbg" key: its draws compile much faster than threefry's on CPU."""
    return jax.random.key(seed, impl="rbg")


def drop_path(x: jax.Array, keys: jax.Array, rate: float, mode: str) -> jax.Array:
    """StochasticDepth in training mode on x, once per key: (K, *x.shape)."""
    op = StochasticDepth(rate, mode)

    def apply(k: jax.Array) -> jax.Array:
        return op.apply({}, x, train=True, rngs={"stochastic_depth": k})

    return jax.jit(jax.vmap(apply))(keys)


def recorded_drop_rates(model: nn.Module, image_size: int) -> list[tuple[float, str]]:
    """(rate, mode) of every StochasticDepth the model calls, in call order."""
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, StochasticDepth) and context.method_name == "__call__":
            seen.append((context.module.rate, context.module.mode))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(key(0), x, train=False), x)
    return seen


def test_linear_rule_from_the_input_to_the_last_block():
    # Huang et al.: p_l = 1 - l/L (1 - p_L) survival, so block l of L drops with rate * l / L.
    np.testing.assert_allclose(linear_drop_rates(0.5, 4), [0.125, 0.25, 0.375, 0.5])
    assert linear_drop_rates(0.0, 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("fields", "num_blocks", "image_size"),
    [({"depth": 20, "family": "cifar"}, 9, 32), ({"depth": 50}, 16, 64)],
)
def test_every_residual_block_follows_the_linear_rule(fields, num_blocks, image_size):
    model = ResNet(10, stochastic_depth_rate=0.3, stochastic_depth_mode="sample", **fields)
    seen = recorded_drop_rates(model, image_size)
    assert [mode for _, mode in seen] == ["sample"] * num_blocks
    np.testing.assert_allclose([rate for rate, _ in seen], linear_drop_rates(0.3, num_blocks))


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_mean_over_masks_is_the_evaluation_output(mode: str):
    # Inverted scaling: E[mask / (1 - rate)] = 1, so averaging training outputs gives x.
    rate, num_keys = 0.3, 20_000
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
    outputs = drop_path(x, jax.random.split(jax.random.key(1), num_keys), rate, mode)
    sigma = np.abs(x) * np.sqrt(rate / (1 - rate) / num_keys)  # std of the mean of the draws
    np.testing.assert_array_less(np.abs(outputs.mean(0) - x), 5 * sigma + 1e-6)
    np.testing.assert_array_equal(StochasticDepth(rate, mode).apply({}, x, train=False), x)


def test_mean_over_masks_of_a_pre_activation_block_is_its_evaluation_output():
    # A pre-activation block is linear in its dropped branch (out = x + mask * branch / keep),
    # so with BatchNorm's statistics held fixed its average training output is the eval one.
    block = ResidualBlock(
        filters=4,
        strides=1,
        bottleneck=False,
        shortcut="A",
        preactivation=True,
        zero_init_last=False,
        conv=nn.Conv,
        norm=functools.partial(nn.BatchNorm, use_running_average=True),
        act=nn.relu,
        drop_path=functools.partial(StochasticDepth, 0.4, "sample"),
    )
    x = jax.random.normal(key(0), (2, 4, 4, 4))
    variables = jax.jit(functools.partial(block.init, train=False))(key(1), x)
    evaluation = block.apply(variables, x, train=False)

    def train(k):
        return block.apply(variables, x, train=True, rngs={"stochastic_depth": k})

    outputs = jax.jit(jax.vmap(train))(jax.random.split(key(2), 20_000))
    branch = np.abs(evaluation - x)
    sigma = branch * np.sqrt(0.4 / 0.6 / 20_000)
    np.testing.assert_array_less(np.abs(outputs.mean(0) - evaluation), 5 * sigma + 1e-5)


def test_batch_mode_drops_the_whole_batch_together():
    rate = 0.25
    outputs = drop_path(jnp.ones((16, 2, 2, 3)), jax.random.split(key(0), 400), rate, "batch")
    outputs = np.asarray(outputs).reshape(400, -1)  # one row per mini-batch
    np.testing.assert_allclose(np.unique(outputs), [0.0, 1 / (1 - rate)], rtol=1e-6)
    assert (outputs == outputs[:, :1]).all()  # every example and element shares the draw
    assert abs((outputs[:, 0] == 0).mean() - rate) < 0.07


def test_sample_mode_drops_each_example_independently():
    rate = 0.25
    outputs = drop_path(jnp.ones((16, 2, 2, 3)), jax.random.split(key(0), 400), rate, "sample")
    per_example = np.asarray(outputs).reshape(400, 16, -1)
    assert (per_example == per_example[..., :1]).all()  # one draw covers a whole example
    dropped = per_example[..., 0] == 0  # (mini-batch, example)
    mixed = (dropped.any(1) & ~dropped.all(1)).mean()  # 1 - 0.75^16 - 0.25^16 = 0.99 expected
    assert mixed > 0.95
    assert abs(dropped.mean() - rate) < 0.03


def small_resnet(rate: float, **fields) -> ResNet:
    return ResNet(5, depth=8, family="cifar", width=0.25, stochastic_depth_rate=rate, **fields)


def test_rate_zero_is_the_plain_network_and_needs_no_rng():
    model = small_resnet(0.0, preactivation=True)
    x = jax.random.normal(key(0), (4, 16, 16, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(key(1), x)
    train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    logits, _ = jax.jit(train)(variables, x)  # no "stochastic_depth" key given

    def skip_stochastic_depth(next_fun, args, kwargs, context):
        if isinstance(context.module, StochasticDepth) and context.method_name == "__call__":
            return args[0]
        return next_fun(*args, **kwargs)

    def plain(variables, x):
        with nn.intercept_methods(skip_stochastic_depth):
            return train(variables, x)

    np.testing.assert_array_equal(logits, jax.jit(plain)(variables, x)[0])


def test_evaluation_is_the_plain_network_and_deterministic():
    model, plain = small_resnet(0.5), small_resnet(0.0)
    x = jax.random.normal(key(0), (4, 16, 16, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(key(1), x)
    evaluate = jax.jit(lambda v: model.apply(v, x, train=False))
    evaluate_plain = jax.jit(lambda v: plain.apply(v, x, train=False))
    np.testing.assert_array_equal(evaluate(variables), evaluate(variables))
    np.testing.assert_array_equal(evaluate(variables), evaluate_plain(variables))


def test_training_draws_only_from_the_stochastic_depth_stream():
    model = small_resnet(0.5)
    x = jnp.ones((2, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(key(0), x, train=False))
    forward = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    jax.eval_shape(lambda v: forward(v, x, rngs={"stochastic_depth": key(1)}), variables)
    with pytest.raises(flax.errors.InvalidRngError, match="stochastic_depth"):
        jax.eval_shape(lambda v: forward(v, x, rngs={"dropout": key(1)}), variables)


def test_unknown_mode_says_what_to_change():
    with pytest.raises(ValueError, match=r"config\.model\.stochastic_depth_mode"):
        StochasticDepth(0.1, "layer").apply({}, jnp.ones((2, 3)), train=True)
