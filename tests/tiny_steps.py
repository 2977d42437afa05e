"""Jitted train and eval steps of a tiny model over some devices, shared by the step tests."""

import jax
import ml_collections
import numpy as np

from cnn_lab import optim, steps
from cnn_lab.averaging import NO_AVERAGES, Averaging
from cnn_lab.models import get_model
from cnn_lab.runtime import sharding
from cnn_lab.state import init_state


def setup(
    model_config: dict,
    devices,
    *,
    image_size: int,
    learning_rate: float,
    label_smoothing: float,
    averaging: Averaging = NO_AVERAGES,
    micro_batches: int = 1,
):
    """(mesh, state, train_step, eval_step): SGD with Nesterov momentum, constant rate."""
    mesh = sharding.make_mesh(devices)
    model = get_model(ml_collections.ConfigDict(model_config))
    config = ml_collections.ConfigDict(
        dict(
            optimizer=dict(
                name="sgd",
                learning_rate=learning_rate,
                momentum=0.9,
                nesterov=True,
                weight_decay=5e-4,
                grad_clip_norm=None,
                param_groups=(),
            ),
            schedule=dict(
                name="constant",
                warmup_epochs=0.0,
                decay_factor=0.1,
                plateau_patience=2,
                plateau_min_delta=1e-3,
            ),
            train=dict(num_epochs=1),
            phases=(),
        )
    )
    schedule, tx, plateau = optim.from_config(config, steps_per_epoch=10, total_steps=10)
    state = init_state(
        model,
        tx,
        plateau,
        jax.random.PRNGKey(0),
        (image_size, image_size, 1),
        mesh,
        averaging=averaging,
    )
    train_step = steps.jit_train_step(
        model,
        tx,
        schedule,
        mesh,
        label_smoothing=label_smoothing,
        averaging=averaging,
        micro_batches=micro_batches,
    )
    return mesh, state, train_step, steps.make_eval_fn(model, mesh)


def batch(image_size: int, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images (n, image_size, image_size, 1) and labels (n,) of 10 classes."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, image_size, image_size, 1)).astype(np.float32),
        "label": rng.integers(0, 10, n).astype(np.int32),
    }
