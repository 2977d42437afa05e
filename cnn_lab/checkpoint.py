"""Orbax checkpoints of the TrainState: latest K, best apart, resume from the newest valid step.

Layout in a workdir: `checkpoints/<step>/` (the latest `keep` steps; resume reads these),
`best/<step>/` (the step with the best validation accuracy, in its own manager, so keeping
it can never evict the latest), `snapshots/<step>/` (the end of each learning-rate cycle,
for snapshot ensembles; never deleted), `broken_checkpoints/` (steps that failed to restore or
validate, moved aside with a warning rather than deleted). Each step directory holds one
Orbax PyTree item, `default`, readable without cnn_lab:
`orbax.checkpoint.StandardCheckpointer().restore("<workdir>/checkpoints/<step>/default")`.
Each step's metadata (`_CHECKPOINT_METADATA`, committed with the step) records a digest of
every array, checked on every restore: damage that still decodes to finite numbers is
caught like a truncated file. Steps written before digests existed restore unchecked.
Reading a finished run's weights for inference (with its model) is `saved_run`.
"""

import concurrent.futures
import json
import os
import shutil
import time
import warnings
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
SNAPSHOT_DIR = "snapshots"
BROKEN_DIR = "broken_checkpoints"
_MUST_BE_FINITE = ("batch_stats", "opt_state", "averages")
_DIGEST_KEY = "cnn_lab_digest"  # In each step's custom metadata.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's, in each step directory.


class CheckpointError(RuntimeError):
    """A workdir's checkpoints cannot be used for this run; the message says why and what to do."""


def make_manager(
    directory: Path, keep: int | None = None, *, read_only: bool = False
) -> ocp.CheckpointManager:
    """Keeps the latest `keep` steps (None: all); `read_only` for evaluation and inspection.

    No `best_fn`: with one, Orbax deletes the newest step when its metric is worse.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        # Processes of a multi-host run meet at barriers named by step: a manager's own
        # prefix keeps latest/ and best/ saving the same step from sharing them.
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=Path(directory).name
        ),
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(), item_handlers=ocp.PyTreeCheckpointHandler(), options=options
    )


def has_steps(directory: Path) -> bool:
    """Whether `directory` holds a finished step (read without opening a manager, which
    would log warnings or create the directory)."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def save(manager: ocp.CheckpointManager, state, step: int) -> None:
    """Start saving `state` as `step`, with its digest; the host copy is taken before this
    returns (async write)."""
    manager.save(
        step, args=ocp.args.PyTreeSave(state), custom_metadata={_DIGEST_KEY: digest(state)}
    )


def digest(tree) -> dict[str, int]:
    """{"path/of/array": the CRC-32 of its bytes} for every array of `tree`.

    Arrays are replicated (the TrainState is), so each process reads its own full copy: on
    CPU without copying. The sums run on threads, which zlib lets run side by side.
    """
    arrays = {"/".join(k): v for k, v in _flat(tree).items() if hasattr(v, "dtype")}
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        sums = pool.map(lambda a: zlib.crc32(np.asarray(a.addressable_data(0))), arrays.values())
        return dict(zip(arrays, sums, strict=True))


def digest_mismatches(manager: ocp.CheckpointManager, step: int, restored) -> list[str]:
    """The arrays of `restored` (step `step`, maybe partial) whose digest differs from the
    one saved with the step; [] for a step saved without digests."""
    # Orbax's step metadata file, read directly: manager.metadata(step) also reads every
    # item's metadata, which took longer than the digests themselves.
    path = Path(manager.directory) / str(step) / _STEP_METADATA_FILE
    try:
        saved = (json.loads(path.read_text()).get("custom_metadata") or {}).get(_DIGEST_KEY)
    except (OSError, ValueError) as error:
        return [f"{path.name} unreadable: {type(error).__name__}: {error}"]
    if saved is None:
        return []
    found = digest(restored)
    return [
        f"{name} does not match its saved digest"
        for name in sorted(found.keys() & saved.keys())
        if found[name] != saved[name]
    ]


def _flat(tree) -> dict[tuple[str, ...], object]:
    return ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True))


def _layout(leaf) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def incompatibilities(saved_metadata, target, *, partial: bool = False) -> list[str]:
    """Where a saved tree (Orbax metadata) differs from `target` in structure, shape or dtype.

    With `partial`, entries saved but absent from `target` are fine (they are not read).
    """
    saved, wanted = _flat(saved_metadata), _flat(target)
    problems = [f"{'/'.join(k)} is missing from the checkpoint" for k in wanted.keys() - saved]
    if not partial:
        problems += [f"{'/'.join(k)} is in the checkpoint only" for k in saved.keys() - wanted]
    for key in wanted.keys() & saved.keys():
        if _layout(saved[key]) != _layout(wanted[key]):
            (s_shape, s_dtype), (w_shape, w_dtype) = _layout(saved[key]), _layout(wanted[key])
            problems.append(
                f"{'/'.join(key)}: saved {s_shape} {s_dtype}, this run has {w_shape} {w_dtype}"
            )
    return sorted(problems)


def nonfinite(tree) -> list[str]:
    """Which weights, statistics or optimizer moments of `tree` hold NaN or infinity."""
    # Weights, statistics and optimizer moments must be finite; bookkeeping such as the
    # plateau tracker's "best so far" legitimately starts at infinity.
    flat = {k: v for k, v in _flat(tree).items() if k[0] in _MUST_BE_FINITE or "params" in k[0]}
    floats = {k: v for k, v in flat.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    finite = jax.device_get({k: jnp.all(jnp.isfinite(v)) for k, v in floats.items()})
    return [f"{'/'.join(k)} has non-finite values" for k, ok in finite.items() if not ok]


def restore_step(manager: ocp.CheckpointManager, step: int, target, *, partial: bool = False):
    """Step `step` placed like `target` (a tree of arrays or ShapeDtypeStructs with shardings).

    Saved dtypes are kept (not cast to the target's), so a caller can validate them.
    With `partial`, only the subtrees present in `target` are read.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    return manager.restore(
        step,
        args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=restore_args, partial_restore=partial
        ),
    )


def _move_aside(
    manager: ocp.CheckpointManager, step: int, reasons: list[str], *, repair: bool
) -> None:
    # One line, without TensorStore's multi-line spec dump: the reason is in its first words.
    why = "; ".join(" ".join(r.split(" See full TensorStore details")[0].split()) for r in reasons)
    if not repair:  # Readers (evaluation scripts) skip damaged steps but never move files.
        warnings.warn(
            f"Checkpoint step {step} in {manager.directory} is damaged ({why[:500]}); skipping it.",
            stacklevel=3,
        )
        return
    broken = Path(manager.directory).parent / BROKEN_DIR
    if jax.process_index() == 0:  # One process moves the files every process reads.
        source = Path(manager.directory) / str(step)
        broken.mkdir(exist_ok=True)
        destination = broken / f"{Path(manager.directory).name}-{step}-{int(time.time())}"
        shutil.move(str(source), str(destination))
        warnings.warn(
            f"Checkpoint step {step} in {manager.directory} is damaged "
            f"({why[:500]}); moved it to {destination} and trying the next "
            "older step.",
            stacklevel=3,
        )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"cnn_lab_move_aside_{manager.directory}_{step}")
    manager.reload()


def _anywhere(damage: list[str]) -> list[str]:
    """`damage` found by this process, or a note if only another process of the run found some.

    Every process must skip the same steps (they restore together), so one process's
    verdict counts for all.
    """
    if jax.process_count() == 1:
        return damage
    damaged = multihost_utils.process_allgather(np.asarray(bool(damage)))
    if damage or not damaged.any():
        return damage
    return [f"processes {np.flatnonzero(damaged).tolist()} of the run could not restore it"]


def restore_newest_valid(
    manager: ocp.CheckpointManager,
    target,
    *,
    partial: bool = False,
    repair: bool = True,
    steps: list[int] | None = None,
):
    """The newest step that restores and validates against `target`; None if there are none.

    `target` may be a function of the step, for runs whose state layout changes with it
    (the optimizer state of training phases).
    Validation: tree structure, shapes and dtypes as in `target`, the saved digests, and
    finite values. Damaged steps (unreadable, half-written or half-deleted, altered,
    non-finite) are moved aside (only skipped without `repair`) and the next older one is
    tried. `steps` limits the
    candidates. A readable step that does not fit `target` (another model
    or optimizer) raises CheckpointError: that is a config problem, not damage.
    """
    candidates = sorted(manager.all_steps() if steps is None else steps, reverse=True)
    target_of = target if callable(target) else lambda _: target
    for step in candidates:
        target = target_of(step)
        try:
            metadata = manager.item_metadata(step).tree
            unreadable = [] if metadata is not None else ["metadata missing"]
        except Exception as error:  # Orbax raises many types for damaged metadata.
            unreadable = [f"metadata unreadable: {type(error).__name__}: {error}"]
        unreadable = _anywhere(unreadable)
        if unreadable:
            _move_aside(manager, step, unreadable, repair=repair)
            continue
        problems = incompatibilities(metadata, target, partial=partial)
        if problems:
            raise CheckpointError(
                f"Checkpoint step {step} in {manager.directory} does not fit this run: "
                f"{'; '.join(problems[:10])}. It was written by a different model or optimizer "
                "config. Use a new --workdir, or the config that wrote it (its config.json)."
            )
        try:
            # Partial even for a whole state: a field added since the step was written and
            # empty in this run (TrainState.loss_scale, None) is absent from the step; every
            # array of `target` was matched above.
            state = restore_step(manager, step, target, partial=True)
            damage = digest_mismatches(manager, step, state) or nonfinite(state)
        except Exception as error:  # Truncated or missing files surface as many error types.
            damage = [f"{type(error).__name__}: {error}"]
        damage = _anywhere(damage)
        if not damage:
            return state
        _move_aside(manager, step, damage, repair=repair)
    if candidates and repair:
        raise CheckpointError(
            f"None of the checkpoint steps {candidates} in {manager.directory} restores; they "
            f"were moved to {Path(manager.directory).parent / BROKEN_DIR} (see the warnings for "
            "why). Rerun to start this run from scratch, or use a new --workdir."
        )
    return None
