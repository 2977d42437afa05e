"""Per-layer output shapes, parameter counts and FLOPs of the configured model, for one image.

python -m cnn_lab.summary --config=configs/<file>.py [--depth=1] [--sweep]

`--sweep` lists instead each point of the config file's get_sweep() (seeds aside): its
parameters, those it drops against the first point, and its FLOPs per image.
"""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cnn_lab import command_line, sweep
from cnn_lab.models import RNG_STREAMS, get_model
from cnn_lab.models.layers import METRICS


def _abstract_variables(model: nn.Module, image_shape: tuple[int, ...]) -> dict:
    """The model's variables (params, batch_stats) as shapes, for one image (H, W, C)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    rngs = {name: jax.random.key(0) for name in ("params", *RNG_STREAMS)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x)
    variables.pop(METRICS, None)  # Sown auxiliary outputs (ODE blocks' NFE), not variables.
    return variables


def _size(tree: dict) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _with_xla_convolutions(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The model of `model_config` on XLA's convolution: counting needs none of the CPU kernels
    (custom calls, whose FLOPs XLA's cost analysis cannot see)."""
    return get_model(ml_collections.ConfigDict({**model_config, "conv_implementation": "xla"}))


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Trainable parameters of `config.model` on `config.data`'s images (shapes only)."""
    data = config.data
    model = _with_xla_convolutions(config.model)
    image_shape = (data.image_size, data.image_size, data.channels)
    return _size(_abstract_variables(model, image_shape)["params"])


def flops_per_image(model_config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> float:
    """Forward FLOPs (evaluation mode) for one image (H, W, C), from XLA's cost analysis.

    A multiply-add counts as two FLOPs, over the real (unpadded) inputs of each convolution.
    The model runs XLA's convolution whatever `conv_implementation` says.
    """
    model = _with_xla_convolutions(model_config)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = _abstract_variables(model, image_shape)
    lowered = jax.jit(lambda v: model.apply(v, x, train=False)).lower(variables)
    return float(lowered.cost_analysis()["flops"])


def with_overrides(
    config: ml_collections.ConfigDict, overrides: sweep.Overrides
) -> ml_collections.ConfigDict:
    """A copy of `config` with a sweep point's `overrides` ({"model.remove": ("fc7",)}) set."""
    config = copy.deepcopy(config)
    for field, value in overrides.items():
        if field == sweep.LABEL:
            continue
        *sections, name = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


def summarize_sweep(config: ml_collections.ConfigDict, points: list[sweep.Overrides]) -> str:
    """A table of each point (seeds merged) of a sweep of `config`: parameters, parameters
    dropped against the first point, and forward FLOPs per image."""
    data = config.data
    image_shape = (data.image_size, data.image_size, data.channels)
    distinct = list({sweep.workdir_name(p): p for p in (_seedless(p) for p in points)}.values())
    lines = [f"{'point':<40} {'parameters':>12} {'dropped':>12} {'FLOPs/image':>14}"]
    first = None
    for point in distinct:
        point_config = with_overrides(config, point)
        count = parameter_count(point_config)
        first = count if first is None else first
        flops = flops_per_image(point_config.model, image_shape)
        name = str(point.get(sweep.LABEL, sweep.workdir_name(point)))
        lines.append(f"{name[:40]:<40} {count:>12,} {first - count:>12,} {flops:>14,.0f}")
    return "\n".join(lines) + "\n"


def _seedless(point: sweep.Overrides) -> sweep.Overrides:
    return {k: v for k, v in point.items() if k != "seed"}


def summarize(config: ml_collections.ConfigDict, depth: int | None = None) -> str:
    """A plain-text table of `config.model` on one (1, image_size, image_size, channels) image.

    Nothing is allocated: shapes come from `jax.eval_shape` and FLOPs from XLA's cost analysis
    of the evaluation-mode forward pass (a multiply-add counts as two FLOPs).

    Args:
      config: needs `model` (name and fields) and `data.image_size`, `data.channels`.
      depth: how many levels of nested modules to list; all when None.

    Returns:
      The table followed by totals for parameters, batch statistics and FLOPs.
    """
    model = get_model(config.model)
    size = config.data.image_size
    x = jnp.zeros((1, size, size, config.data.channels), jnp.float32)
    rngs = {name: jax.random.key(0) for name in ("params", *RNG_STREAMS)}
    table = nn.tabulate(
        model,
        rngs,
        depth=depth,
        compute_flops=True,
        console_kwargs={"force_terminal": False, "no_color": True, "width": 200},
    )(x, train=False)

    variables = _abstract_variables(model, x.shape[1:])
    flops = flops_per_image(config.model, x.shape[1:])
    lines = [f"{config.model.name} on a {x.shape[1:]} image:"]
    for collection in sorted(variables, key=lambda name: name != "params"):
        lines.append(f"  {collection}: {_size(variables[collection]):,}")
    lines.append(f"  FLOPs per image (forward, evaluation mode): {flops:,.0f}")
    return table + "\n".join(lines) + "\n"


def main() -> None:
    """Command line: --config=<file>[:mode] with overrides, --depth."""
    config = config_flags.DEFINE_config_file("config", lock_config=True)
    depth = flags.DEFINE_integer("depth", None, "Module nesting shown; all levels when unset.")
    of_sweep = flags.DEFINE_bool("sweep", False, "List the points of the config's get_sweep().")

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        if not of_sweep.value:
            print(summarize(config.value, depth.value))
            return
        module = sweep.config_module(config_flags.get_config_filename(flags.FLAGS["config"]))
        if not hasattr(module, "get_sweep"):
            raise app.UsageError("--sweep: the config file defines no get_sweep().")
        print(summarize_sweep(config.value, module.get_sweep()))

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
