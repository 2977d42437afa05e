"""Named weight arrays from a file: a PyTorch state_dict (.pth/.pt, needs torch) or a
.safetensors file (read with numpy alone)."""

from pathlib import Path

import numpy as np

from cnn_lab.weights.architectures import TIMM_NAMES

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
TORCH_EXTRA = "pip install 'cnn_lab[torch]'"


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """{"layer1.0.conv1.weight": array, ...} of a state_dict file, in torchvision's names.

    timm's names for the same layers (its VGG head) are renamed, DataParallel's "module."
    prefix is dropped. Raises FileNotFoundError, ValueError (another kind of file, or a
    damaged one) or ModuleNotFoundError (a .pth file without torch installed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--source={str(path)!r} does not exist. Download the weights file first (a "
            "torchvision .pth or a timm/Hugging Face .safetensors) and pass its path."
        )
    if path.suffix == SAFETENSORS_SUFFIX:
        tensors = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        tensors = _read_torch(path)
    else:
        raise ValueError(
            f"--source={str(path)!r}: cnn_lab reads {SAFETENSORS_SUFFIX} files and PyTorch "
            f"state_dicts ({', '.join(TORCH_SUFFIXES)}), not {path.suffix or 'files without a suffix'}."
        )
    return {_torchvision_name(name): array for name, array in tensors.items()}


def _damaged(path: Path, kind: str, error: Exception) -> ValueError:
    return ValueError(
        f"--source={str(path)!r} cannot be read as a {kind} file ({type(error).__name__}: "
        f"{str(error).strip()[:200]}): it is truncated (an interrupted download) or not such a "
        "file. Download it again and check its size or checksum."
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own and OS errors for a bad header.
        raise _damaged(path, "safetensors", error) from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"--source={str(path)!r} is a PyTorch file, and reading it needs PyTorch: "
            f"{TORCH_EXTRA} (the CPU build suffices), or convert the file to .safetensors, "
            "which cnn_lab reads without PyTorch."
        ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, pickle errors, ...
        raise _damaged(path, "PyTorch", error) from None
    for key in ("state_dict", "model"):  # Training checkpoints wrap the state_dict.
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict):
        raise ValueError(
            f"--source={str(path)!r} holds a {type(loaded).__name__}, not a state_dict. Save "
            "the weights with torch.save(model.state_dict(), path)."
        )
    return {
        # float16/bfloat16 weights are read as float32 (numpy has no bfloat16).
        name: (tensor.float() if tensor.is_floating_point() else tensor).detach().numpy()
        for name, tensor in loaded.items()
        if isinstance(tensor, torch.Tensor)
    }


def _torchvision_name(name: str) -> str:
    name = name.removeprefix("module.")
    module, _, leaf = name.rpartition(".")
    return f"{TIMM_NAMES.get(module, module)}.{leaf}"
