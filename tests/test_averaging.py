"""EMA and Polyak averages: their arithmetic, the train step keeping them, BN re-estimation."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnn_lab import averaging
from cnn_lab.evaluation import recompute_batch_stats
from cnn_lab.runtime import sharding

LENET = dict(name="lenet5", num_classes=10)


def _sequence(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"params": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}, "batch_stats": {}}
        for _ in range(n)
    ]


def _run(avg: averaging.Averaging, xs: list[dict]) -> dict:
    """Feed x_1..x_n as the variables after steps 1..n; x_0 is the initial one."""
    accumulators = avg.init(xs[0])
    for step, x in enumerate(xs[1:], start=1):
        accumulators = avg.update(accumulators, x, jnp.int32(step))
    return avg.read(accumulators, jnp.int32(len(xs) - 1))


def test_polyak_average_of_a_known_sequence_is_its_mean():
    xs = _sequence(7)
    for start in (0, 3):
        read = _run(averaging.Averaging(polyak_start_step=start), xs)
        expected = jax.tree.map(lambda *v: np.mean(v, axis=0), *xs[start:])
        chex.assert_trees_all_close(read["polyak"], expected, rtol=1e-6)


def test_ema_with_decay_zero_is_the_latest_variables():
    xs = _sequence(4)
    for debias in (True, False):
        read = _run(averaging.Averaging(ema_decay=0.0, ema_debias=debias), xs)
        chex.assert_trees_all_equal(read["ema"], xs[-1])


def test_debiased_ema_is_a_weighted_mean_of_the_steps():
    xs, decay = _sequence(4), 0.9
    read = _run(averaging.Averaging(ema_decay=decay), xs)
    # Zero-initialised and bias-corrected: weights decay**(t - s) over steps s = 1..t, summing to 1.
    weights = np.array([decay**2, decay, 1.0]) * (1 - decay) / (1 - decay**3)
    expected = sum(w * x["params"]["w"] for w, x in zip(weights, xs[1:], strict=True))
    np.testing.assert_allclose(read["ema"]["params"]["w"], expected, rtol=1e-5)
    undebiased = _run(averaging.Averaging(ema_decay=decay, ema_debias=False), xs)
    expected = decay**3 * xs[0]["params"]["w"] + (1 - decay) * sum(
        decay ** (3 - s) * xs[s]["params"]["w"] for s in (1, 2, 3)
    )
    np.testing.assert_allclose(undebiased["ema"]["params"]["w"], expected, rtol=1e-5)


def test_train_step_keeps_the_averages_on_eight_devices(tiny_steps):
    """Through the jitted, sharded step: EMA(0) follows the params; Polyak is their mean."""
    avg = averaging.Averaging(ema_decay=0.0, polyak_start_step=0)
    mesh, state, train_step, _ = tiny_steps.setup(
        LENET, jax.devices(), image_size=32, learning_rate=0.05, label_smoothing=0.0, averaging=avg
    )
    trajectory = [jax.device_get(state.params)]
    for seed in range(3):
        state, _ = train_step(state, sharding.to_global(tiny_steps.batch(32, seed=seed), mesh))
        trajectory.append(jax.device_get(state.params))
    read = jax.device_get(avg.read(state.averages, state.step))
    chex.assert_trees_all_close(read["ema"]["params"], trajectory[-1], rtol=1e-6)
    mean = jax.tree.map(lambda *v: np.mean(v, axis=0), *trajectory)
    chex.assert_trees_all_close(read["polyak"]["params"], mean, rtol=1e-5, atol=1e-7)
    assert not np.allclose(mean["Dense_2"]["kernel"], trajectory[-1]["Dense_2"]["kernel"])


def test_bad_averaging_config_is_a_clear_error():
    base = dict(
        ema_decay=None,
        ema_debias=True,
        polyak_start_epoch=None,
        batch_stats="average",
        recompute_batches=20,
        select="raw",
    )
    for change, message in (
        (dict(ema_decay=1.5), "ema_decay=1.5"),
        (dict(select="ema"), "select='ema'"),
        (dict(batch_stats="running"), "batch_stats='running'"),
        (dict(recompute_batches=0), "recompute_batches=0"),
    ):
        with pytest.raises(ValueError, match=message):
            averaging.from_config(ml_collections.ConfigDict({**base, **change}), steps_per_epoch=5)


class _NormThenDense(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_recomputed_batch_stats_are_the_mean_of_the_batch_statistics():
    model = _NormThenDense()
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    batches = [
        {"image": (rng.normal(size=(16, 2, 2, 3)) * (k + 1) + k).astype(np.float32)}
        for k in range(3)
    ]
    variables = model.init(jax.random.PRNGKey(0), batches[0]["image"], train=False)
    # Running statistics far from the data's, as an averaged model's would be.
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda s: s + 7.0, variables["batch_stats"]),
    }
    recomputed = recompute_batch_stats(model, variables, batches, mesh)["batch_stats"]
    axes = (0, 1, 2)
    means = np.mean([b["image"].mean(axes) for b in batches], axis=0)
    variances = np.mean([b["image"].var(axes) for b in batches], axis=0)
    np.testing.assert_allclose(recomputed["BatchNorm_0"]["mean"], means, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(recomputed["BatchNorm_0"]["var"], variances, rtol=1e-4)
    no_batch_norm = {"params": variables["params"], "batch_stats": {}}
    assert recompute_batch_stats(model, no_batch_norm, batches, mesh) is no_batch_norm
