"""train_step and eval_step: pure, jitted once by the caller (predict functions: `predictors`)."""

import contextlib
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from cnn_lab import loss_scaling, losses, param_groups
from cnn_lab.averaging import NO_AVERAGES, Averaging
from cnn_lab.models import RNG_STREAMS
from cnn_lab.models.layers import METRICS
from cnn_lab.runtime import sharding
from cnn_lab.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# (uint8 images (B, H, W, C), labels (B,), key) -> (model-ready images, targets (B,) or (B, K)).
Preprocess = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# uint8 images (B, H, W, C) -> model-ready float images.
Normalize = Callable[[jax.Array], jax.Array]


def step_rngs(state: TrainState) -> dict[str, jax.Array]:
    """One key per model RNG stream and one for augmentation ("augment"), folded from the
    state's key and step (resume-exact)."""
    key = jax.random.fold_in(state.rng, state.step)
    streams = (*RNG_STREAMS, "augment")
    return dict(zip(streams, jax.random.split(key, len(streams)), strict=True))


def sown_metrics(sown: dict) -> Metrics:
    """The mean of every scalar a model sowed into its "metrics" collection, by name.

    Models report extras with `self.sow("metrics", name, scalar)`, e.g. an ODE block its
    function evaluations as "ode_nfe"; several modules sowing the same name are averaged.
    `sown` is the collection (model.apply(..., mutable=["metrics"])[1].get("metrics", {}));
    a model that sows nothing gives {}.
    """
    values: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if jnp.ndim(leaf):
            raise ValueError(
                f"A model sowed {name!r} of shape {jnp.shape(leaf)} into the 'metrics' "
                "collection, which takes scalars only; sow a scalar (e.g. its mean) instead."
            )
        values.setdefault(name, []).append(jnp.asarray(leaf, jnp.float32))
    return {name: jnp.mean(jnp.stack(v)) for name, v in sorted(values.items())}


def frozen_norm_interceptor(frozen: tuple[str, ...]) -> Callable:
    """A flax method interceptor running each BatchNorm whose parameters match a `frozen`
    pattern in inference mode: it normalises with, and does not update, its statistics."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        # The path-less inference copy made below passes through too: "^(?!head).*" would
        # match its bare "scale" and copy it again, without end.
        if not (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        if not module.path:
            return next_fun(*args, **kwargs)
        names = ["/".join((*module.path, leaf)) for leaf in ("scale", "bias")]
        if not any(param_groups.matches(frozen, n) for n in names):
            return next_fun(*args, **kwargs)
        # Models may fix use_running_average when building the layer, so it cannot be passed
        # at call time: run an inference-mode copy on the layer's variables (not mutable).
        copy = module.clone(parent=None, use_running_average=True)
        variables = {c: module.variables[c] for c in ("params", "batch_stats")}
        return copy.apply(variables, args[0], **{k: v for k, v in kwargs.items() if k == "mask"})

    return intercept


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    label_smoothing: float,
    preprocess: Preprocess | None = None,
    averaging: Averaging = NO_AVERAGES,
    frozen_norms: tuple[str, ...] = (),
    micro_batches: int = 1,
) -> tuple[TrainState, Metrics]:
    """One optimizer step on batch {"image": (B, H, W, C), "label": (B,)}; metrics are scalars.

    `preprocess` turns the batch's uint8 images into augmented, normalised ones (and labels
    into targets, e.g. mixed ones); None: the images are used as they are. Also updates the
    parameter averages the state keeps (`averaging`). BatchNorm layers matching a
    `frozen_norms` pattern run in inference mode.

    `micro_batches` k > 1 takes one optimizer step with the mean gradient of k micro-batches
    (`_gradients`): the memory of a B / k batch for the update of a B batch.

    A state with a loss scale (float16, `loss_scaling`) scales the loss; a step whose
    gradients overflow leaves the parameters, optimizer state, BatchNorm statistics and
    averages as they were. Its metrics add "skipped_steps" (1.0 for such a step, else 0.0)
    and "loss_scale" (the scale the step used).
    """
    rngs = step_rngs(state)
    augment_key = rngs.pop("augment")
    images, targets = batch["image"], batch["label"]
    if preprocess is not None:
        images, targets = preprocess(images, targets, augment_key)

    def loss_fn(params, batch_stats, images, targets, rngs):
        with contextlib.ExitStack() as stack:
            if frozen_norms:
                stack.enter_context(nn.intercept_methods(frozen_norm_interceptor(frozen_norms)))
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                rngs=rngs,
                mutable=["batch_stats", METRICS],
            )
        logits = logits.astype(jnp.float32)  # Softmax and loss in float32 in any compute dtype.
        loss = jnp.mean(losses.cross_entropy(logits, targets, label_smoothing))
        return loss, (logits, updates.get("batch_stats", {}), updates.get(METRICS, {}))

    # float16: the loss scaled by state.loss_scale, grads unscaled and checked finite.
    grad_fn = loss_scaling.value_and_grad(loss_fn, state.loss_scale)
    grads, batch_stats, (loss, accuracy, sown, loss_scale, finite) = _gradients(
        grad_fn, state, (images, targets, batch["label"]), rngs, micro_batches
    )
    # optax's schedules and Adam bias correction mix python floats with the int32 step count.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        learning_rate = schedule(state.step)
    scale = state.plateau.scale
    updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    variables = {"params": params, "batch_stats": batch_stats}
    updated = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "averages": averaging.update(state.averages, variables, state.step + 1),
    }
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        "learning_rate": learning_rate * scale,
        "grad_norm": optax.tree.norm(grads),
        **sown,
    }
    if state.loss_scale is not None:  # A step whose gradients overflowed changes nothing else.
        updated = loss_scaling.keep_if_finite(
            finite, updated, {k: getattr(state, k) for k in updated}
        )
        updated["loss_scale"] = loss_scale
        metrics["skipped_steps"] = jnp.logical_not(finite).astype(jnp.float32)
        metrics["loss_scale"] = state.loss_scale.scale
    return state.replace(step=state.step + 1, **updated), metrics


def _gradients(
    grad_fn: Callable, state: TrainState, batch: tuple, rngs: dict, micro_batches: int
) -> tuple:
    """(grads, batch_stats, (loss, accuracy, sown metrics, loss_scale, finite)) of `grad_fn` on
    batch (images (B, H, W, C), targets, labels (B,)), in k = `micro_batches` micro-batches.

    With k > 1 the gradient is accumulated over k slices of B / k rows (micro-batch i holds
    rows i, i + k, ..., so each device keeps its own rows), one after another, and averaged.
    BatchNorm normalises each micro-batch by its own statistics and updates its running
    averages k times; dropout and stochastic depth draw fresh keys per micro-batch.
    """

    def one(batch_stats, images, targets, labels, rngs) -> tuple:
        (loss, (logits, batch_stats, sown)), grads, loss_scale, finite = grad_fn(
            state.params, batch_stats, images, targets, rngs
        )
        accuracy = jnp.mean(losses.topk_correct(logits, labels))
        return grads, batch_stats, (loss, accuracy, sown_metrics(sown), loss_scale, finite)

    if micro_batches == 1:
        return one(state.batch_stats, *batch, rngs)

    def accumulate(carry, micro):
        grads_sum, batch_stats = carry
        *arrays, index = micro
        micro_rngs = {name: jax.random.fold_in(key, index) for name, key in rngs.items()}
        grads, batch_stats, outputs = one(batch_stats, *arrays, micro_rngs)
        return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), outputs

    def split(x: jax.Array) -> jax.Array:  # (k, B / k, ...): rows i, i + k, ... in slice i
        return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads_sum, batch_stats), (loss, accuracy, sown, loss_scale, finite) = jax.lax.scan(
        accumulate,
        (zeros, state.batch_stats),
        (*jax.tree.map(split, batch), jnp.arange(micro_batches)),
    )
    grads = jax.tree.map(lambda g: g / micro_batches, grads_sum)
    loss, accuracy, sown = jax.tree.map(jnp.mean, (loss, accuracy, sown))
    loss_scale, finite = loss_scaling.combine_micro_batches(loss_scale, finite)
    return grads, batch_stats, (loss, accuracy, sown, loss_scale, finite)


def jit_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    *,
    label_smoothing: float,
    preprocess: Preprocess | None = None,
    averaging: Averaging = NO_AVERAGES,
    frozen_norms: tuple[str, ...] = (),
    micro_batches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """train_step jitted over `mesh`: state replicated and donated, batch split on the data axis."""
    replicated = sharding.replicated(mesh)
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        label_smoothing=label_smoothing,
        preprocess=preprocess,
        averaging=averaging,
        frozen_norms=frozen_norms,
        micro_batches=micro_batches,
    )
    return jax.jit(
        sharding.traced_over(mesh, step),
        in_shardings=(replicated, sharding.batch_sharded(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


# The sums eval_step returns for every model; its other keys are the model's sown metrics.
EVAL_SUMS = ("loss", "correct", "correct_top5", "count", "class_correct", "class_count")


def eval_step(
    variables: dict, batch: Batch, *, model: nn.Module, normalize: Normalize | None = None
) -> Metrics:
    """Sums over the real rows (batch["mask"]) of a padded batch; `normalize` prepares uint8 images.

    Returns EVAL_SUMS: loss, correct, correct_top5, count (scalars) and class_correct,
    class_count (K,); and each metric the model sowed (`sown_metrics`, one per batch) weighted
    by the batch's real rows, so that summed over batches and divided by count it is a mean
    per example.
    """
    images = batch["image"] if normalize is None else normalize(batch["image"])
    logits, sown = model.apply(variables, images, train=False, mutable=[METRICS])
    logits = logits.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    correct = losses.topk_correct(logits, labels).astype(jnp.float32) * mask
    in_class = jax.nn.one_hot(labels, logits.shape[-1]) * mask[:, None]  # (B, K)
    return {
        "loss": jnp.sum(losses.cross_entropy(logits, labels) * mask),
        "correct": jnp.sum(correct),
        "correct_top5": jnp.sum(losses.topk_correct(logits, labels, 5).astype(jnp.float32) * mask),
        "count": jnp.sum(mask),
        "class_correct": jnp.sum(in_class * correct[:, None], axis=0),
        "class_count": jnp.sum(in_class, axis=0),
        **{k: v * jnp.sum(mask) for k, v in sown_metrics(sown.get(METRICS, {})).items()},
    }


def make_eval_fn(model: nn.Module, mesh: Mesh, normalize: Normalize | None = None) -> Callable:
    """eval_step jitted over `mesh`: replicated variables, batch split over the data axis."""
    return jax.jit(
        sharding.traced_over(mesh, functools.partial(eval_step, model=model, normalize=normalize)),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def batch_stats_sums(variables: dict, images: jax.Array, start: dict, *, model: nn.Module) -> dict:
    """BatchNorm statistics after one training-mode pass over images (B, H, W, C) from `start`.

    Flax updates each statistic as s <- m * s + (1 - m) * batch_value, with the layer's
    momentum m; `recompute_batch_stats` starts from zeros and ones to solve for both.
    """
    _, updates = model.apply(
        {"params": variables["params"], "batch_stats": start},
        images,
        train=True,
        rngs=dict.fromkeys(RNG_STREAMS, jax.random.PRNGKey(0)),
        mutable=["batch_stats"],
    )
    return updates["batch_stats"]
