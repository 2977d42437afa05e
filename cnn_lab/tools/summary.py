"""Per-layer output shapes, parameter counts and FLOPs of the configured model, for one image.

python -m cnn_lab.summary --config=configs/<file>.py [--depth=1]
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cnn_lab import user_input
from cnn_lab.models import RNG_STREAMS, get_model
from cnn_lab.models.layers import METRICS


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

    variables = jax.eval_shape(lambda: model.init(rngs, x, train=False))
    variables.pop(METRICS, None)  # Sown auxiliary outputs (ODE blocks' NFE), not variables.
    flops = (
        jax.jit(lambda v: model.apply(v, x, train=False)).lower(variables).cost_analysis()["flops"]
    )
    lines = [f"{config.model.name} on a {x.shape[1:]} image:"]
    for collection in sorted(variables, key=lambda name: name != "params"):
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables[collection]))
        lines.append(f"  {collection}: {count:,}")
    lines.append(f"  FLOPs per image (forward, evaluation mode): {flops:,.0f}")
    return table + "\n".join(lines) + "\n"


def main() -> None:
    """Command line: --config=<file>[:mode] with overrides, --depth."""
    config = config_flags.DEFINE_config_file("config", lock_config=True)
    depth = flags.DEFINE_integer("depth", None, "Module nesting shown; all levels when unset.")

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        print(summarize(config.value, depth.value))

    app.run(run, flags_parser=user_input.parse_flags)


if __name__ == "__main__":
    main()
