"""Imported torchvision weights give torchvision's logits: every architecture, both file formats.

Each test builds the torchvision model with random weights and random BatchNorm statistics,
saves its state_dict as .safetensors (timm's names for VGG's head) and, for the first of
each family, as .pth too, imports each, and compares cnn_lab's logits (load_run, evaluation mode) with torch's
on one batch. Needs the `torch` extra; skipped without it.
"""

import json
import shutil
import sys
import types

import numpy as np
import pytest

from cnn_lab.data import sources
from cnn_lab.saved_run import load_run
from cnn_lab.weights import import_weights

TOLERANCE = 1e-4


def _torchvision():
    """torchvision's model definitions, or a skip; its C++ ops (unused here) are stubbed, as
    the CPU build of torch cannot load them from torchvision's wheel."""
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed: pip install '.[torch]'")
    sys.modules.setdefault(
        "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
    )
    try:
        import torchvision
    except ImportError:
        pytest.skip("torchvision is not installed: pip install '.[torch]'")
    return torch, torchvision


def random_torchvision_model(arch: str, seed: int = 0):
    """torchvision's `arch` in evaluation mode, with random weights and BatchNorm statistics."""
    torch, torchvision = _torchvision()
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(1000)
    return model.eval()


def logits_of_size(model, images: np.ndarray, largest: float = 5.0) -> np.ndarray:
    """torch's logits (B, 1000) for images (B, 3, H, W), after scaling the last layer so that
    the largest is `largest`: deep ResNets with random statistics reach 1e5, VGG and AlexNet
    with torchvision's init 1e-2, and a fixed tolerance must mean the same for each."""
    import torch

    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
        scale = largest / float(np.abs(logits).max())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
        return model(torch.from_numpy(images)).numpy()


def timm_names(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A VGG state_dict as timm saves it: its head as convolutions with their own names."""
    renamed = {}
    for name, array in arrays.items():
        if name.startswith("classifier.0."):
            name = name.replace("classifier.0", "pre_logits.fc1")
            array = array.reshape(-1, 512, 7, 7) if array.ndim == 2 else array
        elif name.startswith("classifier.3."):
            name = name.replace("classifier.3", "pre_logits.fc2")
            array = array.reshape(-1, 4096, 1, 1) if array.ndim == 2 else array
        renamed[name.replace("classifier.6", "head.fc")] = array
    return renamed


def save_both_formats(model, directory, *, timm: bool = False, pth: bool = True) -> list:
    """The model's state_dict as model.pth (unless not `pth`) and model.safetensors (`timm`: in
    timm's VGG names); their paths."""
    import torch
    from safetensors.numpy import save_file

    paths = []
    if pth:
        paths.append(directory / "model.pth")
        torch.save(model.state_dict(), paths[-1])
    arrays = {name: t.numpy() for name, t in model.state_dict().items()}
    paths.append(directory / "model.safetensors")
    save_file(timm_names(arrays) if timm else arrays, paths[-1])
    return paths


# (torchvision arch, input side, both formats): small images keep the big models fast; VGG at
# 96 and AlexNet at 128 pool a 3x3 map to 7x7 / 6x6 (overlapping bins), AlexNet also at 224
# (none). The .pth reader and torchvision's head names are checked on the first of each
# family; its deeper members differ from it only in their layers, read from .safetensors (in
# timm's names for VGG: the same feature layers, another head).
ARCHS = [
    ("resnet18", 64, True),
    ("resnet34", 64, False),
    ("resnet50", 64, True),
    pytest.param("resnet101", 64, False, marks=pytest.mark.slow),
    pytest.param("resnet152", 32, False, marks=pytest.mark.slow),
    ("vgg11", 96, True),
    ("vgg11_bn", 96, True),
    pytest.param("vgg13", 96, False, marks=pytest.mark.slow),
    pytest.param("vgg13_bn", 96, False, marks=pytest.mark.slow),
    pytest.param("vgg16", 96, False, marks=pytest.mark.slow),
    pytest.param("vgg16_bn", 96, False, marks=pytest.mark.slow),
    pytest.param("vgg19", 64, False, marks=pytest.mark.slow),
    pytest.param("vgg19_bn", 64, False, marks=pytest.mark.slow),
    ("alexnet", 128, True),
    ("alexnet", 224, False),
]


@pytest.mark.parametrize(("arch", "size", "both_formats"), ARCHS)
def test_imported_logits_match_torchvision(arch, size, both_formats, tmp_path):
    model = random_torchvision_model(arch)
    images = np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32)
    expected = logits_of_size(model, images)  # (3, 1000), the largest 5.0
    files = save_both_formats(model, tmp_path, timm=arch.startswith("vgg"), pth=both_formats)
    del model
    try:
        for source in files:
            output = import_weights(arch, source, tmp_path / f"imported_{source.suffix[1:]}")
            flax_model, variables, _ = load_run(output)
            logits = np.asarray(
                flax_model.apply(variables, images.transpose(0, 2, 3, 1), train=False)
            )
            difference = float(np.abs(logits - expected).max())
            print(
                f"{arch} {source.suffix} at {size}x{size}: max |logit difference| {difference:.2e}"
            )
            assert difference < TOLERANCE, (arch, source.suffix, difference)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # VGG's files are ~0.5 GB each.


def test_import_carries_imagenet_preprocessing_and_class_names(tmp_path):
    _torchvision()
    source = save_both_formats(random_torchvision_model("resnet18"), tmp_path)[1]
    output = import_weights("resnet18", source, tmp_path / "imported")
    _, _, config = load_run(output)
    data = config.data
    assert (data.image_size, data.channels, config.model.num_classes) == (224, 3, 1000)
    assert round(data.image_size / data.eval_crop_fraction) == 256  # Resize 256, crop 224.
    assert tuple(data.mean) == (0.485, 0.456, 0.406)
    assert tuple(data.std) == (0.229, 0.224, 0.225)
    names = json.loads((output / sources.CLASSES_FILE).read_text())
    assert len(names) == len(set(names)) == 1000
    assert (
        names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"
    )


@pytest.mark.parametrize(
    ("arch", "count"),
    [
        ("alexnet", 61_100_840),
        ("vgg16", 138_357_544),
        ("vgg19_bn", 143_678_248),
        ("resnet50", 25_557_032),
    ],
)
def test_imported_architectures_have_torchvisions_parameter_counts(arch, count):
    import jax
    import jax.numpy as jnp
    import ml_collections

    from cnn_lab.models import get_model
    from cnn_lab.weights import ARCHITECTURES

    model = get_model(ml_collections.ConfigDict({**ARCHITECTURES[arch].model, "num_classes": 1000}))
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    assert sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])) == count
