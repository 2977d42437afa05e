"""A run's workdir opened for inference: its config, its model, and weights from its checkpoints.

`open_run` reads the config and builds the model once; `SavedRun.restore` then reads any
checkpoint ("best", "latest", a step, "snapshot:<step>") and average ("raw", "ema",
"polyak") of it. Only parameters and BatchNorm statistics are read (no optimizer state),
onto the CPU; files are never modified.
"""

import dataclasses
import functools
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cnn_lab import averaging
from cnn_lab import workdir as workdir_lib
from cnn_lab.checkpoint import (
    BEST_DIR,
    LATEST_DIR,
    SNAPSHOT_DIR,
    CheckpointError,
    make_manager,
    restore_newest_valid,
)
from cnn_lab.data import sources
from cnn_lab.models import get_model

Variables = dict  # {"params": ..., "batch_stats": ...}


def _checkpoint_steps(workdir: Path, checkpoint: str | int) -> tuple[Path, list[int] | None]:
    """The directory `checkpoint` names, and which of its steps to try (None: newest valid)."""
    name = str(checkpoint)
    if name.startswith("snapshot:") and name[len("snapshot:") :].isdigit():
        return workdir / SNAPSHOT_DIR, [int(name[len("snapshot:") :])]
    if name.isdigit():
        return workdir / LATEST_DIR, [int(name)]
    if name in ("best", "latest"):
        return workdir / (BEST_DIR if name == "best" else LATEST_DIR), None
    raise ValueError(
        f"checkpoint={checkpoint!r}: use 'best', 'latest', a step number or 'snapshot:<step>'."
    )


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """A run's workdir, the config it was trained with, and its model (built for this host)."""

    workdir: Path
    config: ml_collections.ConfigDict
    model: nn.Module

    @functools.cached_property
    def averages(self) -> averaging.Averaging:
        """The parameter averages the run keeps (config.averaging), to read them back."""
        # The start step does not matter for reading the averages, only for updating them.
        return averaging.from_config(self.config.averaging, steps_per_epoch=1)

    @functools.cached_property
    def _variable_shapes(self) -> Variables:
        """ShapeDtypeStructs of the model's parameters and BatchNorm statistics."""
        data = self.config.data
        images = jax.ShapeDtypeStruct(
            (1, data.image_size, data.image_size, data.channels), jnp.float32
        )
        shapes = jax.eval_shape(
            lambda x: self.model.init(jax.random.PRNGKey(0), x, train=False), images
        )
        return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}

    def snapshot_steps(self) -> list[int]:
        """The steps of the run's snapshots (ends of learning-rate cycles), oldest first."""
        directory = self.workdir / SNAPSHOT_DIR
        if not directory.is_dir():
            return []
        with make_manager(directory, read_only=True) as manager:
            return sorted(manager.all_steps())

    def restore(
        self, checkpoint: str | int = "best", average: str = "raw"
    ) -> tuple[Variables, int]:
        """(variables, step) of `checkpoint` ("best", "latest", a step number or
        "snapshot:<step>") with the weights of `average` ("raw", or a kept average such as
        "ema" or "polyak"); `model.apply(variables, images, train=False)` runs inference."""
        if average != "raw" and average not in self.averages.names:
            names = self.averages.names
            raise ValueError(
                f"average={average!r}: {self.workdir} kept {list(names) or 'no averages'} "
                "(config.averaging). Use 'raw'" + "".join(f", {n!r}" for n in names) + "."
            )
        target = {"step": jax.ShapeDtypeStruct((), jnp.int32)}
        variables = self._variable_shapes
        target |= variables if average == "raw" else {"averages": {average: variables}}
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), target
        )
        directory, wanted = _checkpoint_steps(self.workdir, checkpoint)
        if not directory.is_dir():
            raise CheckpointError(
                f"{self.workdir} has no {directory.name}/ directory: the run has not saved "
                f"{'a best checkpoint' if checkpoint == 'best' else 'that checkpoint'} yet."
            )
        with make_manager(directory, read_only=True) as manager:
            available = sorted(manager.all_steps())
            if wanted is not None and wanted[0] not in available:
                raise CheckpointError(
                    f"{self.workdir} has no checkpoint at step {wanted[0]} in {directory.name}/. "
                    f"Saved steps: {available}; or use --checkpoint=best / latest."
                )
            restored = restore_newest_valid(
                manager, target, partial=True, repair=False, steps=wanted or available
            )
        if restored is None:
            raise CheckpointError(
                f"{directory} holds no valid checkpoint (steps found: {available}): the run has "
                "not saved one yet, or they are damaged (see the warnings). Another of its "
                "checkpoints may serve: --checkpoint=latest, or a step number."
            )
        step = int(restored.pop("step"))
        if average != "raw":
            restored = self.averages.read(restored["averages"], jnp.int32(step))[average]
        return restored, step


def open_run(workdir: str | Path) -> SavedRun:
    """The run in `workdir`: its config read and its model built, once for every restore."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"Workdir {workdir} does not exist. Pass the --workdir of a run.")
    config = workdir_lib.read_config(workdir)
    config.data.class_names = sources.read_class_names(workdir, config)  # Label order.
    # The run's convolution suited its machine; this one (maybe with a GPU) picks its own.
    model = get_model(ml_collections.ConfigDict({**config.model, "conv_implementation": "auto"}))
    return SavedRun(workdir, config, model)


def load_run(
    workdir: str | Path, checkpoint: str | int = "best", average: str = "raw"
) -> tuple[nn.Module, Variables, ml_collections.ConfigDict]:
    """(model, variables, config) of a finished or running run, on CPU, for inference.

    `model.apply(variables, images, train=False)` gives logits (B, num_classes) for images
    (B, H, W, C) preprocessed as in `config.data`. `checkpoint` is "best" (validation
    accuracy), "latest", a step number or "snapshot:<step>"; `average` is "raw", or "ema" /
    "polyak" for the run's averaged weights. Only the parameters and BatchNorm statistics
    are read (no optimizer state); files are never modified.
    """
    run = open_run(workdir)
    variables, _ = run.restore(checkpoint, average)
    return run.model, variables, run.config
