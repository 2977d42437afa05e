"""The sharded train and eval steps: same results on 1 and 8 devices, no recompilation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_lab import steps
from cnn_lab.runtime import sharding


@pytest.fixture
def make_steps(tiny_steps):
    """make_steps(model_config, devices): tiny_steps.setup over 8x8 images."""
    return functools.partial(tiny_steps.setup, image_size=8, learning_rate=0.1, label_smoothing=0.1)


@pytest.fixture
def make_batch(tiny_steps):
    """make_batch(n=16, seed=0): random 8x8 images and labels."""
    return functools.partial(tiny_steps.batch, 8)


# A model with dropout, so the step RNG is exercised too.
CONVNET = dict(name="convnet", num_classes=10, hidden_size=32, dropout_rate=0.5)


def test_eight_devices_match_one_device(make_steps, make_batch):
    assert jax.device_count() == 8
    runs = {}
    for n in (1, 8):
        mesh, state, train_step, _ = make_steps(CONVNET, jax.devices()[:n])
        for i in range(3):
            state, metrics = train_step(state, sharding.to_global(make_batch(seed=i), mesh))
        runs[n] = (jax.device_get(state.params), float(metrics["loss"]))
        assert state.params["Dense_0"]["kernel"].sharding.is_fully_replicated
    chex.assert_trees_all_close(runs[1][0], runs[8][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(runs[1][1], runs[8][1], rtol=1e-5)


def test_train_step_compiles_once_and_changes_params(make_steps, make_batch):
    mesh, state, train_step, _ = make_steps(CONVNET, jax.devices())
    before = jax.device_get(state.params)
    for i in range(3):
        state, _ = train_step(state, sharding.to_global(make_batch(seed=i), mesh))
    assert train_step._cache_size() == 1
    assert int(state.step) == 3
    moved = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), before, jax.device_get(state.params)
    )
    assert all(jax.tree.leaves(moved))


def test_dropout_keys_differ_per_step(make_steps):
    _mesh, state, _train_step, _ = make_steps(CONVNET, jax.devices()[:1])
    keys = [steps.step_rngs(state.replace(step=jnp.int32(s)))["dropout"] for s in (0, 1)]
    assert not np.array_equal(keys[0], keys[1])


def test_batch_size_not_divisible_by_devices_is_a_clear_error():
    mesh = sharding.make_mesh(jax.devices())
    with pytest.raises(
        ValueError, match=r"batch_size=12 does not split over 8 devices.*multiple of 8"
    ):
        sharding.check_batch_size(12, mesh, "config.train.batch_size")


def test_eval_step_counts_only_real_rows(make_steps, make_batch):
    mesh, state, _, eval_step = make_steps(CONVNET, jax.devices())
    batch = make_batch(16)
    batch["mask"] = np.arange(16) < 11
    sums = eval_step(state.variables, sharding.to_global(batch, mesh))
    assert float(sums["count"]) == 11
    assert 0 <= float(sums["correct"]) <= 11
    np.testing.assert_array_equal(
        sums["class_count"], np.bincount(batch["label"][:11], minlength=10)
    )
    assert float(sums["class_correct"].sum()) == float(sums["correct"])
