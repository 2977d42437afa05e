"""Look inside a trained model: `python -m cnn_lab.tools.inspect_run --workdir=<dir> [--checkpoint=best]`.

Writes into <workdir>/inspect/:
- `filters.png`: the first convolution's kernels, each scaled to [0, 1] on its own (RGB
  when the images have 3 channels, grey otherwise);
- `patches_<layer>.png`, one per chosen convolution: for each of its first `--maps`
  feature maps (one row each), the 9 images of the split that activate the map most
  (its largest value over positions), cropped to the receptive field of the unit where
  it peaks (Zeiler & Fergus, 2014);
- `confusion_<split>.png` and `confusion_<split>.json` (the counts and per-class accuracy);
and `curves.png` into the workdir when the run has metrics but no plot yet.

Receptive fields are measured, not derived from a layer table: a unit's field is the
bounding box of the input pixels with a non-zero gradient of the unit, over a few random
inputs (so max pooling's and ReLU's input-dependent routing is covered for any model).
"""

import dataclasses
import functools
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cnn_lab import checkpoint, command_line, metric_writer, saved_run
from cnn_lab.data import augment, inputs
from cnn_lab.data.inputs import split_string
from cnn_lab.models import layers
from cnn_lab.tools import predict
from cnn_lab.workdir import INSPECT_DIR

TOP = 9  # Patches shown per feature map.
MIN_TILE = 32  # Tiles are scaled up (nearest) to at least this many pixels a side.
BORDER = 2  # Pixels between tiles.
RF_SAMPLES = 8  # Random inputs whose gradients are united into a receptive field.


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A convolution of the model: its path ("Conv_0", "stage1_block1/Conv_0") and kernel."""

    path: tuple[str, ...]
    kernel_shape: tuple[int, ...]  # (kh, kw, C_in, C_out)

    @property
    def name(self) -> str:
        """The path as one string."""
        return "/".join(self.path)


def conv_layers(model: nn.Module, variables: dict, image_shape: tuple[int, int, int]) -> list:
    """Every convolution module (nn.Conv, layers.Conv) of `model`, in forward-pass order."""
    convs = predict.modules_called(
        model, variables, image_shape, lambda m: isinstance(m, (nn.Conv, layers.Conv))
    )
    return [
        ConvLayer(path, tuple(_at(variables["params"], path)["kernel"].shape))
        for path in (tuple(m.path) for m in convs)
    ]


def _at(tree: dict, path: tuple[str, ...]):
    """The subtree of a nested dict at `path`."""
    for key in path:
        tree = tree[key]
    return tree


def layer_outputs(model: nn.Module, paths: tuple[tuple[str, ...], ...]) -> Callable:
    """f(variables, images (B, H, W, C)) -> ({path: output (B, h, w, C_out)}, logits (B, K))."""
    wanted = set(paths)

    def apply(variables, images):
        logits, state = model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=lambda m, method: method == "__call__" and m.path in wanted,
            mutable=["intermediates"],
        )
        outputs = {path: _at(state["intermediates"], path)["__call__"][0] for path in paths}
        return outputs, logits

    return apply


def _tile_grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    """Tiles (h, w, 3) in [0, 1], scaled up to MIN_TILE, in rows of `columns`: uint8 (H, W, 3)."""
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    rows = math.ceil(len(tiles) / columns)
    cell_h, cell_w = height * scale + BORDER, width * scale + BORDER
    grid = np.ones((rows * cell_h + BORDER, columns * cell_w + BORDER, 3), np.float32)
    for i, tile in enumerate(tiles):
        big = tile.repeat(scale, 0).repeat(scale, 1)
        top, left = BORDER + (i // columns) * cell_h, BORDER + (i % columns) * cell_w
        grid[top : top + big.shape[0], left : left + big.shape[1]] = big
    return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    """(h, w, C) -> (h, w, 3): RGB as it is, one channel as grey, others their mean as grey."""
    if image.shape[-1] == 3:
        return image
    return np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)


def filter_tiles(kernel: np.ndarray) -> list[np.ndarray]:
    """One (kh, kw, 3) tile per filter of a kernel (kh, kw, C_in, C_out), each scaled to [0, 1]."""
    tiles = []
    for f in np.moveaxis(np.asarray(kernel, np.float32), -1, 0):
        low, high = f.min(), f.max()
        tiles.append(_rgb((f - low) / (high - low) if high > low else np.zeros_like(f)))
    return tiles


def receptive_fields(
    unit_of: Callable[[dict, jax.Array, jax.Array], jax.Array],
    variables: dict,
    image_shape: tuple[int, int, int],
    positions: np.ndarray,
    key: jax.Array,
) -> np.ndarray:
    """Boxes (n, 4) [top, left, bottom, right) in the image of the units at positions (n, 2).

    `unit_of(variables, image (H, W, C), position (2,))` is the unit's output summed over
    channels.
    """
    images = jax.random.normal(key, (RF_SAMPLES, *image_shape))
    grad = jax.grad(unit_of, argnums=1)

    @jax.jit
    def reach(variables: dict, images: jax.Array, positions: jax.Array) -> jax.Array:
        """(n, H, W): which pixels move each unit, for any of the images."""
        per_image = jax.vmap(functools.partial(grad, variables), (0, None))
        return jax.vmap(lambda p: jnp.any(per_image(images, p) != 0, axis=(0, 3)))(positions)

    boxes = []
    for start in range(0, len(positions), 16):  # Chunks bound memory for large images.
        for mask in np.asarray(
            reach(variables, images, jnp.asarray(positions[start : start + 16]))
        ):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            if len(rows) == 0:  # A unit no input reaches (dead): show the whole image.
                boxes.append((0, 0, image_shape[0], image_shape[1]))
            else:
                boxes.append((rows[0], cols[0], rows[-1] + 1, cols[-1] + 1))
    return np.asarray(boxes, np.int32).reshape(-1, 4)


def _peaks(apply: Callable, normalize: Callable) -> Callable:
    """jit of (variables, uint8 images (B, H, W, C)) -> ({layer: (maxima (B, C), argmax (B, C))},
    predicted classes (B,)): only these small arrays leave the devices."""

    @jax.jit
    def peaks(variables: dict, images: jax.Array):
        outputs, logits = apply(variables, normalize(images))
        flat = {p: out.reshape(out.shape[0], -1, out.shape[-1]) for p, out in outputs.items()}
        reduced = {p: (f.max(1), f.argmax(1)) for p, f in flat.items()}
        return reduced, jnp.argmax(logits, -1)

    return peaks


def _predict(
    peaks: Callable, variables: dict, batches: Iterable[dict], widths: dict, limit: int
) -> tuple:
    """The first `limit` real rows of padded `batches`: their uint8 images and labels, every
    layer output's per-map maxima and argmax positions (rows, cols), and predicted classes."""
    parts: dict = {}
    images, labels, predictions = [], [], []
    for batch in batches:  # One shape for every batch: compiled once.
        reduced, predicted = jax.device_get(peaks(variables, batch["image"]))
        real = batch["mask"]
        images.append(batch["image"][real])
        labels.append(batch["label"][real])
        predictions.append(predicted[real])
        for path, (value, where) in reduced.items():
            rows, cols = np.divmod(where[real], widths[path])
            parts.setdefault(path, []).append((value[real], np.stack([rows, cols], -1)))
    joined = {
        p: (np.concatenate([v for v, _ in ps])[:limit], np.concatenate([w for _, w in ps])[:limit])
        for p, ps in parts.items()
    }
    return (
        np.concatenate(images)[:limit],
        np.concatenate(labels)[:limit],
        joined,
        np.concatenate(predictions)[:limit],
    )


def _same_size(crops: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 crops (h, w, C) resized (nearest) to the largest side: fields clipped at the
    image border come out as large as whole ones."""
    side = max(max(c.shape[:2]) for c in crops)
    resized = []
    for crop in crops:
        image = Image.fromarray(crop[..., 0] if crop.shape[-1] == 1 else crop)
        array = np.asarray(image.resize((side, side), Image.NEAREST))
        resized.append(array.reshape(side, side, crop.shape[-1]))
    return resized


def _save(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


def confusion_plot(confusion: np.ndarray, names: list[str], title: str, path: Path) -> Path:
    """Draw a confusion matrix (true rows, predicted columns), counts written when few classes."""
    import matplotlib

    matplotlib.use("Agg")  # Files only: training machines have no display.
    import matplotlib.pyplot as plt

    k = len(names)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * k, 1.5 + 0.5 * k))
    ax.imshow(confusion, cmap="Blues")
    if k <= 20:
        for (i, j), count in np.ndenumerate(confusion):
            color = "white" if count > confusion.max() / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def inspect_run(
    workdir: str | Path,
    checkpoint_name: str = "best",
    split: str = "val",
    layers: tuple[str, ...] = (),
    maps: int = 8,
    max_examples: int = 2000,
    batch_size: int = 256,
) -> dict[str, Path]:
    """Write the images and tables of a run into <workdir>/inspect/; returns their paths by kind.

    `layers`: paths of convolutions to show top patches of (default: every one);
    `maps`: how many feature maps of each (the first ones); `max_examples`: the first this
    many examples of `split` are searched and classified.
    """
    workdir = Path(workdir)
    run = saved_run.open_run(workdir)
    model, config = run.model, run.config
    variables, step = run.restore(checkpoint_name)
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    convs = conv_layers(model, variables, image_shape)
    if not convs:
        raise ValueError(f"{workdir}: model {config.model.name!r} has no convolution to inspect.")
    by_name = {c.name: c for c in convs}
    unknown = [name for name in layers if name not in by_name]
    if unknown:
        raise ValueError(f"--layers {unknown} are not convolutions of the model: {list(by_name)}.")
    chosen = [by_name[name] for name in layers] or convs
    out = workdir / INSPECT_DIR
    out.mkdir(exist_ok=True)
    written = {}

    kernel = np.asarray(_at(variables["params"], convs[0].path)["kernel"])
    columns = math.ceil(math.sqrt(kernel.shape[-1]))
    written["filters"] = _save(_tile_grid(filter_tiles(kernel), columns), out / "filters.png")

    apply = jax.jit(layer_outputs(model, tuple(c.path for c in chosen)))
    # The first max_examples of the split, read as evaluation reads it (streamed if need be).
    batches = inputs.eval_batches(config.data, split_string(config.data, split), batch_size)
    batches = itertools.islice(batches, math.ceil(max_examples / batch_size))
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    widths = {p: out.shape[2] for p, out in jax.eval_shape(apply, variables, x)[0].items()}
    normalize = augment.normalizer(tuple(config.data.mean), tuple(config.data.std))
    images, labels, peaks, predictions = _predict(
        _peaks(apply, normalize), variables, batches, widths, max_examples
    )

    key = jax.random.PRNGKey(0)
    for layer in chosen:
        values, where = peaks[layer.path]  # (N, C), (N, C, 2)
        shown = min(maps, values.shape[1])
        top = np.argsort(-values[:, :shown], axis=0, kind="stable")[:TOP].T  # (shown, TOP)
        positions = np.stack([where[top[m], m] for m in range(shown)]).reshape(-1, 2)

        def unit(variables, image, position, path=layer.path):
            out_map = apply(variables, image[None])[0][path][0]  # (h, w, C)
            return jnp.sum(out_map[position[0], position[1]])

        boxes = receptive_fields(unit, variables, image_shape, positions, key)
        crops = [
            images[index, t:b, left:r]
            for index, (t, left, b, r) in zip(top.ravel(), boxes, strict=True)
        ]
        tiles = [_rgb(c.astype(np.float32) / 255.0) for c in _same_size(crops)]
        name = layer.name.replace("/", "_")
        written[f"patches_{name}"] = _save(_tile_grid(tiles, TOP), out / f"patches_{name}.png")

    k = config.model.num_classes
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = [
        float(confusion[i, i] / n) if (n := confusion[i].sum()) else math.nan for i in range(k)
    ]
    names = list(config.data.class_names)  # Attached by saved_run: classes.json, or numbers.
    table = {
        "workdir": str(workdir),
        "checkpoint": checkpoint_name,
        "step": step,
        "split": split,
        "count": len(labels),
        "accuracy": float(np.mean(predictions == labels)),
        "classes": names,
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
    }
    written["confusion_json"] = out / f"confusion_{split}.json"
    written["confusion_json"].write_text(json.dumps(table, indent=2) + "\n")
    title = f"{split}: accuracy {table['accuracy']:.4f} ({len(labels)} examples, step {step})"
    written["confusion"] = confusion_plot(confusion, names, title, out / f"confusion_{split}.png")
    curves = workdir / metric_writer.CURVES_FILE
    if not curves.exists() and metric_writer.read_metrics(workdir):
        written["curves"] = metric_writer.plot_curves(workdir)
    return written


def main() -> None:
    """Command line: --workdir, --checkpoint, --split, --layers, --maps, --max_examples."""
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
    which = flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
    split = flags.DEFINE_string("split", "val", "train | val | test | any TFDS split string.")
    layers = flags.DEFINE_list("layers", [], "Convolutions to show patches of (default: all).")
    maps = flags.DEFINE_integer("maps", 8, "Feature maps per layer (the first ones).")
    max_examples = flags.DEFINE_integer("max_examples", 2000, "Examples of the split searched.")

    def run(argv: list[str]) -> None:
        del argv
        try:
            written = inspect_run(
                workdir.value,
                which.value,
                split.value,
                tuple(layers.value),
                maps.value,
                max_examples.value,
            )
        except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as error:
            sys.exit(f"error: {error}")  # The message says what to change; no traceback.
        for path in written.values():
            print(path)

    app.run(run, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    main()
