"""Schedules and the optimizer chain built from the config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnn_lab import optim


def _schedule(**kw):
    base = dict(name="cosine", warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1)
    return ml_collections.ConfigDict({**base, **kw})


def test_cosine_with_warmup():
    s = optim.make_schedule(_schedule(warmup_epochs=1.0), 0.1, steps_per_epoch=10, total_steps=100)
    np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.05, 0.1], atol=1e-7)
    assert float(s(55)) == pytest.approx(0.05, abs=1e-6)  # half way through the cosine
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


def test_piecewise_decays_at_epoch_boundaries():
    s = optim.make_schedule(
        _schedule(name="piecewise", decay_epochs=(2, 4)), 1.0, steps_per_epoch=10, total_steps=60
    )
    np.testing.assert_allclose([s(19), s(20), s(39), s(40)], [1.0, 0.1, 0.1, 0.01], rtol=1e-6)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown schedule 'linear'.*cosine"):
        optim.make_schedule(_schedule(name="linear"), 0.1, steps_per_epoch=1, total_steps=1)
    oc = ml_collections.ConfigDict(dict(name="rmsprop", weight_decay=0.0, grad_clip_norm=None))
    with pytest.raises(ValueError, match=r"Unknown optimizer 'rmsprop'.*adamw"):
        optim.make_optimizer(oc, optax.constant_schedule(0.1))


def test_weight_decay_skips_biases():
    oc = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.0, nesterov=False, weight_decay=0.1, grad_clip_norm=None)
    )
    tx = optim.make_optimizer(oc, optax.constant_schedule(1.0))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * np.ones((2, 2)))
    np.testing.assert_allclose(updates["bias"], np.zeros(2))


def test_plateau_divides_by_ten_after_patience():
    schedule_config = ml_collections.ConfigDict(
        dict(name="plateau", decay_factor=0.1, plateau_patience=2, plateau_min_delta=1e-3)
    )
    feed_plateau = optim.plateau_feedback(schedule_config)  # feeds make_plateau 1 - accuracy
    state = optim.make_plateau(schedule_config).init({})
    scales = []
    for accuracy in (0.5, 0.6, 0.6, 0.6, 0.6):
        state = feed_plateau(state, accuracy)
        scales.append(float(state.scale))
    assert scales[:3] == [1.0, 1.0, 1.0]
    assert scales[3] == pytest.approx(0.1)


def test_only_the_plateau_schedule_is_cut_by_stalled_validation():
    from cnn_lab.state import TrainState, record_validation

    schedule_config = dict(decay_factor=0.1, plateau_patience=1, plateau_min_delta=1e-3)
    plateau = optim.make_plateau(ml_collections.ConfigDict(schedule_config))
    scales = {}
    for name in ("plateau", "cosine"):
        feed_plateau = optim.plateau_feedback(
            ml_collections.ConfigDict(dict(name=name, **schedule_config))
        )
        state = TrainState(
            step=0,
            params={},
            batch_stats={},
            opt_state=(),
            rng=None,
            plateau=plateau.init({}),
            best_val_accuracy=jnp.float32(0),
            best_val_epoch=jnp.int32(0),
            averages={},
        )
        for epoch in range(1, 5):
            # The raw model stalls; the selected one (an average, say) still improves.
            state = record_validation(
                state,
                jnp.float32(0.5),
                jnp.float32(0.5 + epoch / 100),
                jnp.int32(epoch),
                feed_plateau=feed_plateau,
            )
        scales[name] = float(state.plateau.scale)
        assert int(state.best_val_epoch) == 4  # selection follows the selected model
    assert scales == {"plateau": pytest.approx(0.001), "cosine": 1.0}
