"""Published ImageNet weights (torchvision or timm files) as a cnn_lab run directory.

`python -m cnn_lab.import_weights --arch=resnet50 --source=resnet50.pth --output=DIR` writes
DIR/config.json (the model, ImageNet's data settings and its evaluation preprocessing:
shorter side resized to 256, centre 224x224 crop, RGB, ImageNet mean and std),
DIR/best/0/ (an Orbax checkpoint of the parameters and BatchNorm statistics, as training
saves them) and DIR/classes.json (the 1,000 ImageNet classes in label order, as runs keep theirs).
`load_run(DIR)`, `python -m cnn_lab.evaluate --workdir=DIR` and
`--config.init_from.workdir=DIR` read it as they read a trained run.
"""

import hashlib
import importlib.resources
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from cnn_lab import checkpoint, command_line
from cnn_lab import workdir as workdir_lib
from cnn_lab.data.sources import save_class_names
from cnn_lab.models import get_model
from cnn_lab.runtime import provenance, sharding
from cnn_lab.weights import architectures, sources
from cnn_lab.weights.architectures import Architecture

IMPORTED_STEP = 0  # The step of the one checkpoint an import writes, in best/.
IMAGE_SIZE = 224  # torchvision's ImageNet evaluation: centre 224 of the 256-resized image.
CROP_FRACTION = 0.875

Variables = dict  # {"params": ..., "batch_stats": ...}

# (collection, cnn_lab leaf) -> PyTorch's parameter or buffer name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet (ILSVRC-2012) class names, in the order of torchvision's labels."""
    text = importlib.resources.files(__package__).joinpath("imagenet_classes.txt").read_text()
    return text.splitlines()


def imagenet_config(arch: str) -> ml_collections.ConfigDict:
    """The config of an imported `arch`: its model, and ImageNet's data and preprocessing."""
    from cnn_lab.configs import common  # The defaults of every knob, as a trained run records them.

    config = common.get_base_config("imagenet2012", image_size=IMAGE_SIZE)
    config.data.train_split = "train[:99%]"  # As configs/resnet50_imagenet.py.
    config.data.validation_split = "train[99%:]"
    config.data.test_split = "validation"  # The 50k images papers report on.
    config.data.input_mode = "streaming"
    config.data.eval_crop_fraction = CROP_FRACTION  # Resize to 256, take the centre 224.
    for field, value in architectures.get(arch).model.items():
        config.model[field] = value
    return config


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch layout of a cnn_lab array's shape: conv (O, I, H, W), dense (O, I)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1]


def _to_cnn_lab(array: np.ndarray, shape: tuple[int, ...], flattened: tuple[int, int] | None):
    """A PyTorch array in cnn_lab's layout `shape`: conv kernels (H, W, I, O), dense (I, O)."""
    if len(shape) == 4:
        array = array.transpose(2, 3, 1, 0)
    elif len(shape) == 2:
        array = array.reshape(shape[1], -1)  # timm's convolutional head: (O, I, 1, 1) etc.
        if flattened is not None:  # Rows of a flattened (C, H, W) map -> (H, W, C).
            height, width = flattened
            out = array.shape[0]
            array = array.reshape(out, -1, height, width).transpose(0, 2, 3, 1).reshape(out, -1)
        array = array.T
    return np.ascontiguousarray(array, dtype=np.float32)


def convert(
    tensors: dict[str, np.ndarray], shapes: Variables, architecture: Architecture, what: str
) -> Variables:
    """cnn_lab variables of the model whose variable shapes are `shapes`, from `tensors` in
    torchvision's names and layouts.

    Raises ValueError listing the first arrays missing, left over or of another shape
    (`what` names the source and architecture in it).
    """
    converted, problems, expected = {}, [], set()
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(shapes.get(collection, {}))
        converted[collection] = {}
        for path, leaf in flat.items():
            module = "/".join(path[:-1])
            name = f"{architecture.torch_module(module)}.{_LEAF_NAMES[collection, path[-1]]}"
            expected.add(name)
            want = _torch_shape(leaf.shape)
            if name not in tensors:
                problems.append(f"{name} {want} is missing")
                continue
            got = tensors[name].shape
            if int(np.prod(got)) != int(np.prod(want)) or got[:1] != want[:1]:
                problems.append(f"{name} has shape {got}, expected {want}")
                continue
            converted[collection][path] = _to_cnn_lab(
                tensors[name], leaf.shape, architecture.flattened.get(module)
            )
    # BatchNorm's update counter has no use here (cnn_lab's momentum is fixed).
    left_over = [n for n in tensors if n not in expected and not n.endswith(".num_batches_tracked")]
    problems += [f"{name} {tensors[name].shape} is not in the model" for name in left_over]
    if problems:
        raise ValueError(
            f"{what}: {len(problems)} of the file's arrays do not fit, first "
            f"{'; '.join(problems[:6])}. The file holds another architecture (or another "
            f"variant of it): pass the --arch it was saved from ({', '.join(architectures.ARCHITECTURES)})."
        )
    return {c: traverse_util.unflatten_dict(v) for c, v in converted.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_weights(arch: str, source: str | Path, output: str | Path) -> Path:
    """Write `source`'s weights of torchvision's `arch` as a cnn_lab run directory `output`.

    Returns `output`. Raises ValueError for an unknown `arch`, a file of another
    architecture, a damaged file or an `output` that is not empty; FileNotFoundError for a
    missing `source`; ModuleNotFoundError for a .pth file without torch installed.
    """
    source, output = Path(source), Path(output)
    config = imagenet_config(arch)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(
            f"--output={str(output)!r} exists and is not an empty directory. Pass a new "
            "directory (it is created), or delete this one."
        )
    tensors = sources.read_tensors(source)
    # Shapes only: the kernels cnn_lab would pick for CPU training are not needed for that.
    model = get_model(ml_collections.ConfigDict({**config.model, "conv_implementation": "xla"}))
    images = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    variables = convert(tensors, shapes, architectures.get(arch), f"--source={str(source)!r}")
    record = provenance.collect(sharding.make_mesh(jax.devices()[:1]), "xla")
    record["imported_from"] = {"arch": arch, "file": str(source), "sha256": _sha256(source)}
    write_run(output, config, variables, record, imagenet_class_names())
    return output


def write_run(
    directory: Path,
    config: ml_collections.ConfigDict,
    variables: Variables,
    record: dict,
    class_names: list[str],
) -> None:
    """A run directory for inference and fine-tuning: `variables` as checkpoint best/0/,
    config.json (with `record` as its provenance) and the class names (classes.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = jax.device_put({"step": np.int32(IMPORTED_STEP), **variables})
    with checkpoint.make_manager(directory / checkpoint.BEST_DIR) as manager:
        checkpoint.save(manager, state, IMPORTED_STEP)
        manager.wait_until_finished()
    save_class_names(directory, class_names)
    workdir_lib.write_config(directory, config, record)  # Last: it marks the directory complete.


def main() -> None:
    """Command line: --arch, --source, --output."""
    from absl import app, flags

    arch = flags.DEFINE_string("arch", None, f"One of {', '.join(architectures.ARCHITECTURES)}.")
    source = flags.DEFINE_string("source", None, "A torchvision .pth/.pt or a .safetensors file.")
    output = flags.DEFINE_string("output", None, "The run directory to write (new or empty).")
    flags.mark_flags_as_required(["arch", "source", "output"])

    def run(argv: list[str]) -> None:
        del argv
        try:
            written = import_weights(arch.value, source.value, output.value)
        except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:
            command_line.report(error)
        print(
            f"Imported {arch.value} into {written}: evaluate or fine-tune it with "
            f"--workdir={written} or --config.init_from.workdir={written}."
        )

    app.run(run, flags_parser=command_line.parse_flags)
