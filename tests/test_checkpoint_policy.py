"""The checkpoint policy: which managers save, in which order, and never a non-finite state."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from cnn_lab import checkpoint, optim
from cnn_lab.checkpoint_policy import CheckpointPolicy
from cnn_lab.state import TrainState


def _state(step: int, mean: float = 0.0) -> TrainState:
    plateau = optim.make_plateau(
        ml_collections.ConfigDict(
            dict(decay_factor=0.1, plateau_patience=1, plateau_min_delta=1e-3)
        )
    )
    return TrainState(
        step=jnp.int32(step),
        params={"dense": {"kernel": jnp.ones((2, 2))}},
        batch_stats={"norm": {"mean": jnp.full((2,), mean)}},
        opt_state={"momentum": jnp.zeros((2, 2))},
        rng=jax.random.PRNGKey(0),
        plateau=plateau.init({}),
        best_val_accuracy=jnp.float32(0.5),
        best_val_epoch=jnp.int32(1),
        averages={},
    )


def _policy(workdir, snapshot_steps=()) -> CheckpointPolicy:
    latest = checkpoint.make_manager(workdir / checkpoint.LATEST_DIR, 2)
    return CheckpointPolicy(latest, workdir, list(snapshot_steps))


def test_a_non_finite_state_is_not_saved(tmp_path):
    policy = _policy(tmp_path)
    policy.save_latest(_state(2), 2)
    with pytest.raises(FloatingPointError, match=r"Non-finite state at step 4 \(batch_stats/norm"):
        policy.save_epoch(_state(4, mean=float("nan")), 4, best=True)
    policy.close()
    assert checkpoint.make_manager(
        tmp_path / checkpoint.LATEST_DIR, read_only=True
    ).all_steps() == [2]
    assert not checkpoint.make_manager(tmp_path / checkpoint.BEST_DIR, read_only=True).all_steps()


def test_an_epoch_saves_best_only_when_validation_improved(tmp_path):
    policy = _policy(tmp_path)
    policy.save_epoch(_state(4), 4, best=True)
    policy.save_epoch(_state(8), 8, best=False)
    policy.close()
    assert policy.latest.all_steps() == [4, 8]
    assert policy.best.all_steps() == [4]


def test_resume_catches_up_the_best_and_snapshot_steps_a_kill_left_unsaved(tmp_path):
    # Killed after latest/ saved step 4 (the best epoch's end, a cycle's end) but before the rest.
    policy = _policy(tmp_path, snapshot_steps=[4])
    policy.save_latest(_state(4), 4)
    policy.close()
    policy = _policy(tmp_path, snapshot_steps=[4])
    policy.catch_up(_state(4), 4, best_step=4)
    policy.close()
    assert policy.best.all_steps() == [4]
    assert policy.snapshots.all_steps() == [4]
    # A best epoch behind the restored step is not re-taken.
    policy = _policy(tmp_path / "other", snapshot_steps=[4])
    policy.catch_up(_state(8), 8, best_step=4)
    policy.close()
    assert not policy.best.all_steps()
    assert not policy.snapshots.all_steps()
