"""Parameter paths matched against the config's patterns: frozen sets and learning-rate groups.

A path names a leaf of the params (or batch_stats) tree with "/", e.g. "Conv_0/kernel" or
"Stage_1/Block_0/BatchNorm_0/scale". A pattern is a regular expression that matches a path
when it matches the whole path or a whole leading part of it: "Conv_0" matches
"Conv_0/kernel" but not "Conv_01/kernel"; "Dense_.*" matches every dense layer.
"""

import re
from collections.abc import Iterable, Sequence

import jax

FROZEN = "frozen"  # Label of the parameters that get no updates and no optimizer state.
DEFAULT = "default"  # Label of trainable parameters in no learning-rate group.


def path_name(path: tuple) -> str:
    """ "Conv_0/kernel" for a jax tree path of dict keys."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def matches(patterns: Iterable[str], path: str) -> bool:
    """Whether any pattern matches `path` whole or a whole leading part of it ("a/b" of "a/b/c")."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(re.fullmatch(p, prefix) for p in patterns for prefix in prefixes)


def paths(tree) -> list[str]:
    """Every leaf's path in `tree`, in tree order."""
    return [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def check_patterns(patterns: Iterable[str], tree, what: str) -> None:
    """Raise ValueError naming each pattern that matches no path of `tree` (`what` names the knob)."""
    names = paths(tree)
    unused = [p for p in patterns if not any(matches([p], n) for n in names)]
    if unused:
        raise ValueError(
            f"{what} pattern(s) {unused} match no parameter. Parameter paths are: "
            f"{', '.join(names)}. Fix the pattern (a regular expression matching a whole path "
            "or its leading module names, e.g. 'Conv_0' or 'Dense_.*')."
        )


def group_name(index: int) -> str:
    """The label of the index-th learning-rate group of config.optimizer.param_groups."""
    return f"group_{index}"


def labels(params, frozen: Sequence[str], groups: Sequence[Sequence]) -> dict:
    """Each parameter's label: FROZEN, group_name(i) of the first matching group, or DEFAULT.

    `groups` is config.optimizer.param_groups: ((pattern, learning-rate multiplier), ...).
    """
    check_patterns(frozen, params, "Frozen (config.phases[..].freeze)")
    check_patterns([g[0] for g in groups], params, "config.optimizer.param_groups")

    def label(path, _) -> str:
        name = path_name(path)
        if matches(frozen, name):
            return FROZEN
        return next(
            (group_name(i) for i, (p, _) in enumerate(groups) if matches([p], name)), DEFAULT
        )

    return jax.tree_util.tree_map_with_path(label, params)
