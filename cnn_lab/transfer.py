"""Transfer learning: start a run from another run's weights, with a new classifier head.

`config.init_from.workdir` names a run's workdir (its `init_from.checkpoint`: best, latest
or a step) or an Orbax checkpoint directory (`<workdir>/checkpoints/<step>`). Parameters
and BatchNorm statistics whose paths match `init_from.load` are copied from it; those
matching `init_from.head` (the classifier, sized for the old classes) keep their fresh
initialisation, as does everything `load` does not match. Freezing and the head-then-all
recipe are training phases (`config.phases`, `optim.make_phases`).
"""

from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cnn_lab import param_groups, saved_run
from cnn_lab import workdir as workdir_lib

Variables = dict  # {"params": ..., "batch_stats": ...}
COLLECTIONS = ("params", "batch_stats")


def read_variables(source: str | Path, checkpoint_name: str = "best") -> Variables:
    """Parameters and BatchNorm statistics (NumPy, on the host) of a workdir or Orbax checkpoint."""
    source = Path(source)
    if (source / workdir_lib.CONFIG_FILE).exists():
        variables, _ = saved_run.open_run(source).restore(checkpoint_name)
        return jax.device_get(variables)
    item = source / "default" if (source / "default").is_dir() else source
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            saved = checkpointer.metadata(item).item_metadata.tree
            wanted = {c: saved[c] for c in COLLECTIONS if c in saved}
            if "params" not in wanted:
                raise KeyError("params")
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            variables = checkpointer.restore(
                item,
                args=ocp.args.PyTreeRestore(
                    item=wanted, restore_args=restore_args, partial_restore=True
                ),
            )
    except Exception as error:  # Orbax raises many types for a path that is no checkpoint.
        raise FileNotFoundError(
            f"config.init_from.workdir={str(source)!r} is neither a run's workdir (no "
            f"{workdir_lib.CONFIG_FILE}) nor an Orbax checkpoint of a train state with params "
            f"({type(error).__name__}: {error}). Point it at a workdir or at "
            "<workdir>/checkpoints/<step>."
        ) from None
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _flat(tree) -> dict[str, object]:
    """{"Conv_0/kernel": leaf, ...} of a variables collection."""
    return dict(zip(param_groups.paths(tree), jax.tree.leaves(tree), strict=True))


def _rgb_kernel_for_grey(saved: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """Whether `saved` is a convolution kernel (H, W, 3, O) of RGB input where (H, W, 1, O)
    of grey input is wanted."""
    return len(saved) == len(wanted) == 4 and saved[2] == 3 and wanted == (*saved[:2], 1, saved[3])


def transplant(
    fresh: Variables,
    saved: Variables,
    *,
    load: tuple[str, ...],
    head: tuple[str, ...],
    source: str = "the checkpoint",
) -> Variables:
    """`fresh` with every leaf matching `load` and not `head` taken from `saved`.

    A first convolution saved for RGB input is summed over its colours for a grey model.

    Raises ValueError naming each such leaf that `saved` lacks or holds with another shape
    (a head that was not declared), and each pattern that matches nothing.
    """
    both = {c: fresh.get(c, {}) for c in COLLECTIONS}
    every_leaf = {name: leaf for c in COLLECTIONS for name, leaf in _flat(both[c]).items()}
    param_groups.check_patterns(load, every_leaf, "config.init_from.load")
    param_groups.check_patterns(head, every_leaf, "config.init_from.head")
    problems = []

    def pick(collection: str):
        available = _flat(saved.get(collection, {}))

        def leaf(path, value):
            name = param_groups.path_name(path)
            if param_groups.matches(head, name) or not param_groups.matches(load, name):
                return value
            if name not in available:
                problems.append(f"{collection}/{name} is not in {source}")
                return value
            old = np.asarray(available[name])
            if _rgb_kernel_for_grey(old.shape, value.shape):
                # Grey pixels are R = G = B: the RGB kernel summed over its colours sees
                # them as the RGB network would (timm's in_chans=1), e.g. ImageNet -> digits.
                old = old.sum(axis=2, keepdims=True)
            if old.shape != value.shape:
                problems.append(
                    f"{collection}/{name}: {source} has shape {old.shape}, this model {value.shape}"
                )
                return value
            return old.astype(value.dtype)

        return jax.tree_util.tree_map_with_path(leaf, both[collection])

    result = {c: pick(c) for c in COLLECTIONS}
    if problems:
        raise ValueError(
            f"Cannot initialise from {source}: {'; '.join(problems)}. If these are the "
            "classifier head (sized for the old classes), list them in config.init_from.head "
            "(e.g. 'Dense_2' or 'head'); otherwise load only what fits with "
            "config.init_from.load, or use a checkpoint of the same architecture."
        )
    return result


def initial_variables(init_config: ml_collections.ConfigDict, fresh: Variables) -> Variables:
    """The variables a run starts from: `fresh` with config.init_from's subtrees loaded."""
    saved = read_variables(init_config.workdir, str(init_config.checkpoint))
    return transplant(
        jax.device_get(fresh),
        saved,
        load=tuple(init_config.load),
        head=tuple(init_config.head),
        source=str(init_config.workdir),
    )
