"""TrainState: the one pytree that is jitted, donated and checkpointed."""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale
from jax.sharding import Mesh

from cnn_lab.averaging import NO_AVERAGES, Averaging
from cnn_lab.optim import PlateauFeedback
from cnn_lab.runtime import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly; all leaves are arrays."""

    step: jax.Array  # () int32: optimizer steps taken.
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} for models without BN).
    opt_state: optax.OptState
    rng: jax.Array  # (2,) uint32 base key; step keys are fold_in(rng, step).
    plateau: optax.OptState  # Reduce-on-plateau state; its scale multiplies every update.
    best_val_accuracy: jax.Array  # () float32, for early stopping.
    best_val_epoch: jax.Array  # () int32, the epoch that reached it.
    averages: dict  # {"ema"|"polyak": variables}: accumulators of averaging.Averaging ({} if off).
    # float16's dynamic loss scale (cnn_lab.loss_scaling); None (no leaves): not scaled. Last,
    # with a default: checkpoints written before it existed restore with None.
    loss_scale: DynamicScale | None = None

    @property
    def variables(self) -> dict:
        """What `model.apply` needs for inference."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    plateau: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    averaging: Averaging = NO_AVERAGES,
    loss_scale: DynamicScale | None = None,
) -> TrainState:
    """A fresh state: parameters initialised from `rng` for images of `image_shape` (H, W, C),
    with `loss_scale` (`loss_scaling.from_config`; None: float32 or bfloat16)."""
    init_rng, train_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=train_rng,
        plateau=plateau.init({}),
        best_val_accuracy=jnp.zeros((), jnp.float32),
        best_val_epoch=jnp.zeros((), jnp.int32),
        averages=averaging.init({"params": params, "batch_stats": batch_stats}),
        loss_scale=loss_scale,
    )


def start_from(
    state: TrainState,
    variables: dict,
    tx: optax.GradientTransformation,
    averaging: Averaging = NO_AVERAGES,
) -> TrainState:
    """`state` with `variables` ({"params", "batch_stats"}) in place of its own, and the
    optimizer state and averages made for them (transfer learning's starting point)."""
    return state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        averages=averaging.init(variables),
    )


def restart_optimizer(state: TrainState, tx: optax.GradientTransformation) -> TrainState:
    """`state` with a fresh state of optimizer `tx` (a new training phase begins)."""
    return state.replace(opt_state=tx.init(state.params))


def record_validation(
    state: TrainState,
    raw_accuracy: jax.Array,
    accuracy: jax.Array,
    epoch: jax.Array,
    *,
    feed_plateau: PlateauFeedback,
) -> TrainState:
    """Track the best validation `accuracy` (of config.averaging.select's model) and its `epoch`.

    `raw_accuracy` goes to `feed_plateau` (optim.plateau_feedback): the rate steers the raw model.
    """
    improved = accuracy > state.best_val_accuracy
    return state.replace(
        plateau=feed_plateau(state.plateau, raw_accuracy),
        best_val_accuracy=jnp.where(improved, accuracy, state.best_val_accuracy),
        best_val_epoch=jnp.where(improved, epoch, state.best_val_epoch),
    )


def out_of_patience(state: TrainState, epoch: int, patience: int | None) -> bool:
    """Whether `epoch` epochs in, validation has not improved for `patience` epochs."""
    return patience is not None and epoch - int(state.best_val_epoch) >= patience


def init_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    plateau: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, int, int],
    mesh: Mesh,
    *,
    averaging: Averaging = NO_AVERAGES,
    loss_scale: DynamicScale | None = None,
    abstract: bool = False,
) -> TrainState:
    """`create_train_state`, jitted so the state is created replicated over `mesh`.

    With `abstract`, only its shapes, dtypes and shardings: a restore target that
    allocates nothing.
    """
    create = functools.partial(
        create_train_state,
        model,
        tx,
        plateau,
        image_shape=image_shape,
        averaging=averaging,
        loss_scale=loss_scale,
    )
    jitted = jax.jit(create, out_shardings=sharding.replicated(mesh))
    return jitted.eval_shape(rng) if abstract else jitted(rng)
