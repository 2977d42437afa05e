"""Parameter averages kept in the train state: EMA (bias-corrected) and Polyak (uniform).

Each average is a copy of the model's variables ({"params", "batch_stats"}): the BatchNorm
statistics are averaged with the same weights as the parameters, so an averaged model is
never evaluated with the raw model's statistics (`config.averaging.batch_stats="recompute"`
re-estimates them instead; see `evaluation.recompute_batch_stats`). Both averages are updated
inside the jitted train step, and their update counts follow from the state's step, so
they are checkpointed and resumed with it at no extra cost.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cnn_lab.optim import epochs_to_steps

Variables = dict


@dataclasses.dataclass(frozen=True)
class Averaging:
    """Which averages a run keeps; `None` switches one off."""

    ema_decay: float | None = None
    ema_debias: bool = True
    polyak_start_step: int | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The averages kept, in the order they are reported."""
        return tuple(
            name
            for name, on in (
                ("ema", self.ema_decay is not None),
                ("polyak", self.polyak_start_step is not None),
            )
            if on
        )

    def init(self, variables: Variables) -> dict[str, Variables]:
        """The accumulators before step 1: zeros for a debiased EMA, else the variables."""
        zeros = jax.tree.map(jnp.zeros_like, variables)
        return {
            name: zeros if name == "ema" and self.ema_debias else variables for name in self.names
        }

    def update(
        self, averages: dict[str, Variables], variables: Variables, step: jax.Array
    ) -> dict[str, Variables]:
        """The accumulators after optimizer step `step` (1-based) produced `variables`."""
        new = {}
        if "ema" in averages:
            new["ema"] = optax.tree.update_moment(variables, averages["ema"], self.ema_decay, 1)
        if "polyak" in averages:
            # Before the start step the average follows the model; from it on, the running
            # mean of the variables after steps start, start + 1, ..., step (0: the initial).
            count = jnp.maximum(step - self.polyak_start_step + 1, 1).astype(jnp.float32)
            new["polyak"] = jax.tree.map(
                lambda avg, x: avg + (x - avg) / count.astype(x.dtype),
                averages["polyak"],
                variables,
            )
        return new

    def read(self, averages: dict[str, Variables], step: jax.Array) -> dict[str, Variables]:
        """Each average's variables, ready to evaluate, after `step` optimizer steps."""
        read = dict(averages)
        if "ema" in averages and self.ema_debias:
            # Zero-initialised, so after t steps its weights sum to 1 - decay**t (Adam's fix).
            # A float32 count: optax raises the python float decay to it (float ** int32 is an
            # implicit promotion; XLA computes the power in float32 either way).
            read["ema"] = optax.tree.bias_correction(
                averages["ema"], self.ema_decay, jnp.maximum(step, 1).astype(jnp.float32)
            )
        return read


NO_AVERAGES = Averaging()


def from_config(averaging_config: ml_collections.ConfigDict, *, steps_per_epoch: int) -> Averaging:
    """The averages `config.averaging` asks for; epochs become optimizer steps."""
    ac = averaging_config
    if ac.ema_decay is not None and not 0.0 <= ac.ema_decay < 1.0:
        raise ValueError(
            f"config.averaging.ema_decay={ac.ema_decay} is outside [0, 1). Use e.g. 0.999, or "
            "None to switch EMA off."
        )
    if ac.recompute_batches < 1:
        raise ValueError(
            f"config.averaging.recompute_batches={ac.recompute_batches}: use at least 1."
        )
    if ac.batch_stats not in ("average", "recompute"):
        raise ValueError(
            f"config.averaging.batch_stats={ac.batch_stats!r}: use 'average' or 'recompute'."
        )
    start = ac.polyak_start_epoch
    averaging = Averaging(
        ema_decay=ac.ema_decay,
        ema_debias=ac.ema_debias,
        polyak_start_step=None if start is None else epochs_to_steps(start, steps_per_epoch),
    )
    if ac.select not in ("raw", *averaging.names):
        raise ValueError(
            f"config.averaging.select={ac.select!r}, but this run keeps "
            f"{list(averaging.names) or 'no averages'}. Use 'raw', or switch that average on "
            "(config.averaging.ema_decay / polyak_start_epoch)."
        )
    return averaging
