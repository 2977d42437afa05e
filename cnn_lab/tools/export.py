"""Export a run's model for use without cnn_lab:
`python -m cnn_lab.export --workdir=W --format=stablehlo|savedmodel [--batch=polymorphic]
[--include_preprocessing] [--output=DIR]`.

- `stablehlo`: DIR/model.stablehlo, a `jax.export` artifact with the weights inside, for
  CPU and CUDA. Plain JAX runs it: `jax.export.deserialize(bytearray(open(path, "rb").read()))
  .call(images)`.
- `savedmodel`: DIR is a TensorFlow SavedModel (jax2tf), signature `serving_default`:
  `images` -> `logits`. `tf.saved_model.load(DIR).signatures["serving_default"](images=...)`.

Both take images (B, H, W, C) at the run's image size: float32 already normalised as in
evaluation, or with `--include_preprocessing` uint8 pixels (0-255), normalised in the graph.
Resizing and cropping stay outside (signature.json says to what). Beside the artifact:
class_names.txt (one a line, in label order) and signature.json.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cnn_lab import checkpoint, command_line, saved_run
from cnn_lab.data import augment
from cnn_lab.models import get_model

FORMATS = ("stablehlo", "savedmodel")
STABLEHLO_FILE = "model.stablehlo"
SIGNATURE_FILE = "signature.json"
CLASS_NAMES_FILE = "class_names.txt"  # Beside an artifact: one class a line, label order.
PLATFORMS = ("cpu", "cuda")  # Where the artifacts run.
EXPORT_DIR = "export"  # In the workdir, one folder per format, unless --output says where.


def inference_function(
    run: saved_run.SavedRun, *, include_preprocessing: bool
) -> tuple[Callable, jnp.dtype]:
    """f(variables, images) -> logits (B, K) of the run's model on XLA's own convolutions
    (cnn_lab's CPU kernels would not load elsewhere), and the dtype of the images it takes."""
    model = get_model(ml_collections.ConfigDict({**run.config.model, "conv_implementation": "xla"}))
    data = run.config.data
    normalize = augment.normalizer(tuple(data.mean), tuple(data.std))

    def logits(variables, images: jax.Array) -> jax.Array:
        if include_preprocessing:
            images = normalize(images)  # uint8 (B, H, W, C) -> normalised float32
        return model.apply(variables, images, train=False).astype(jnp.float32)

    return logits, jnp.uint8 if include_preprocessing else jnp.float32


def _export_stablehlo(fn: Callable, variables, images: jax.ShapeDtypeStruct, output: Path) -> None:
    exported = jax.export.export(jax.jit(lambda x: fn(variables, x)), platforms=PLATFORMS)(images)
    (output / STABLEHLO_FILE).write_bytes(exported.serialize())


def _export_savedmodel(fn: Callable, variables, shape: tuple, dtype, output: Path) -> None:
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as error:
        raise ModuleNotFoundError(
            f"--format=savedmodel needs TensorFlow ({error}): pip install tensorflow-cpu "
            "(a dependency of cnn_lab: pip install -e . restores it)."
        ) from None
    batch = "b" if shape[0] is None else str(shape[0])
    converted = jax2tf.convert(
        fn,
        polymorphic_shapes=[None, f"({batch}, {', '.join(map(str, shape[1:]))})"],
        with_gradient=False,
        native_serialization_platforms=PLATFORMS,
    )
    module = tf.Module()
    # Weights as variables, not graph constants: protobuf caps a graph at 2 GB.
    module.model_variables = tf.nest.map_structure(tf.Variable, jax.device_get(variables))
    module.serve = tf.function(
        lambda images: {"logits": converted(module.model_variables, images)},
        autograph=False,
        input_signature=[tf.TensorSpec(shape, tf.as_dtype(np.dtype(dtype)), name="images")],
    )
    tf.saved_model.save(module, str(output), signatures={"serving_default": module.serve})


def export_run(
    workdir: str | Path,
    format: str,
    output: str | Path | None = None,
    *,
    checkpoint_name: str = "best",
    average: str = "raw",
    batch: str = "polymorphic",
    include_preprocessing: bool = False,
) -> Path:
    """Export the model of `workdir` (`checkpoint_name`, `average`) as `format`; returns the
    folder written (default <workdir>/export/<format>).

    `batch` is "polymorphic" (any batch size) or a number.
    """
    if format not in FORMATS:
        raise ValueError(f"--format={format!r} is not one of {', '.join(FORMATS)}.")
    if batch != "polymorphic" and not (batch.isdigit() and int(batch) > 0):
        raise ValueError(f"--batch={batch!r}: use 'polymorphic' or a batch size such as 1.")
    workdir = Path(workdir)
    run = saved_run.open_run(workdir)
    variables, step = run.restore(checkpoint_name, average)
    fn, dtype = inference_function(run, include_preprocessing=include_preprocessing)
    data = run.config.data
    shape = (None if batch == "polymorphic" else int(batch), data.image_size, data.image_size)
    shape += (data.channels,)
    output = Path(output) if output else workdir / EXPORT_DIR / format
    if output.exists():
        shutil.rmtree(output)  # A re-export replaces the previous one whole.
    output.mkdir(parents=True)
    if format == "stablehlo":
        symbolic = jax.export.symbolic_shape(",".join(str(d or "b") for d in shape))
        _export_stablehlo(fn, variables, jax.ShapeDtypeStruct(symbolic, dtype), output)
    else:
        _export_savedmodel(fn, variables, shape, dtype, output)
    names = list(run.config.data.class_names)
    (output / CLASS_NAMES_FILE).write_text("".join(f"{n}\n" for n in names))
    signature = {
        "input": {
            "shape": list(shape),
            "dtype": np.dtype(dtype).name,
            "values": "pixels 0-255, normalised inside"
            if include_preprocessing
            else f"(pixels / 255 - mean) / std, mean {list(data.mean)}, std {list(data.std)}",
            "channels": "RGB" if data.channels == 3 else "grey",
            "resize_shorter_side_to": round(data.image_size / data.eval_crop_fraction),
            "centre_crop": data.image_size,
        },
        "output": f"logits (B, {run.config.model.num_classes}), classes in {CLASS_NAMES_FILE}",
        "workdir": str(workdir),
        "checkpoint": checkpoint_name,
        "step": step,
        "average": average,
        "platforms": list(PLATFORMS),
    }
    (output / SIGNATURE_FILE).write_text(json.dumps(signature, indent=2) + "\n")
    return output


def main() -> None:
    """Command line: --workdir, --format, --batch, --include_preprocessing, --output."""
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "The run (or imported weights) to export.")
    format_ = flags.DEFINE_enum("format", None, FORMATS, "stablehlo | savedmodel.")
    which = flags.DEFINE_string("checkpoint", "best", "best | latest | a step | snapshot:<step>.")
    average = flags.DEFINE_string("average", "raw", "raw, or a kept average (ema, polyak).")
    batch = flags.DEFINE_string("batch", "polymorphic", "polymorphic, or a fixed batch size.")
    preprocessing = flags.DEFINE_bool(
        "include_preprocessing", False, "Take uint8 pixels and normalise them in the graph."
    )
    output = flags.DEFINE_string(
        "output", None, "Folder to write (default <workdir>/export/<format>)."
    )
    flags.mark_flags_as_required(["workdir", "format"])

    def run(argv: list[str]) -> None:
        del argv
        try:
            written = export_run(
                workdir.value,
                format_.value,
                output.value,
                checkpoint_name=which.value,
                average=average.value,
                batch=batch.value,
                include_preprocessing=preprocessing.value,
            )
        except (
            FileNotFoundError,
            ValueError,
            ModuleNotFoundError,
            checkpoint.CheckpointError,
        ) as error:
            command_line.report(error)
        size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file())
        print(
            f"Exported {workdir.value} as {format_.value} into {written} ({size / 2**20:.1f} MiB)."
        )

    app.run(run, flags_parser=command_line.parse_flags)
