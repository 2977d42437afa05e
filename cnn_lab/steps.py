"""train_step and eval_step: pure functions of (state, batch), jitted once by the caller."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnn_lab import losses
from cnn_lab.models import RNG_STREAMS
from cnn_lab.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def step_rngs(state: TrainState) -> dict[str, jax.Array]:
    """One key per model RNG stream, folded from the state's key and step (resume-exact)."""
    key = jax.random.fold_in(state.rng, state.step)
    return dict(zip(RNG_STREAMS, jax.random.split(key, len(RNG_STREAMS)), strict=True))


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    label_smoothing: float,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on batch {"image": (B, H, W, C), "label": (B,)}; metrics are scalars."""

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            train=True,
            rngs=step_rngs(state),
            mutable=["batch_stats"],
        )
        loss = jnp.mean(losses.cross_entropy(logits, batch["label"], label_smoothing))
        return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(losses.topk_correct(logits, batch["label"])),
        "learning_rate": schedule(state.step) * scale,
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: nn.Module) -> Metrics:
    """Sums over the real rows (batch["mask"]) of a padded batch: loss, correct, top5, count."""
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    return {
        "loss": jnp.sum(losses.cross_entropy(logits, labels) * mask),
        "correct": jnp.sum(losses.topk_correct(logits, labels) * mask),
        "correct_top5": jnp.sum(losses.topk_correct(logits, labels, 5) * mask),
        "count": jnp.sum(mask),
    }
