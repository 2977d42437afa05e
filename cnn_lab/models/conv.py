"""Which convolution the models run: XLA's native one, or oneDNN's on a CPU.

XLA's CPU convolution keeps about one core busy and, for every kernel gradient, copies the
activations into a batch-minor layout (recomputing batch norm and ReLU on the way); that
copying took as long as the convolutions in a ResNet-20 train step. oneDNN (the library
behind PyTorch's CPU convolutions) computes the forward pass and both gradients on NHWC
arrays directly, with every core. `config.model.conv_implementation` picks:

- "xla": `lax.conv_general_dilated`, on any backend.
- "onednn": oneDNN through XLA's FFI (CPU, one device in the whole run: the FFI call is not
  partitioned over a mesh). The C++ file beside
  this one is compiled on first use (about 5 s, g++ and the pinned `onednn-devel-cpu-gomp`
  wheel) into ~/.cache/cnn_lab and loaded from there afterwards. Calls it does not take
  (not float32, grouped, transposed, negative padding, not 2-D NHWC/HWIO) run XLA's
  convolution instead.
- "auto": "onednn" when the run is float32 on one CPU device and oneDNN loads, else "xla";
  accelerators always get XLA's own kernels.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

IMPLEMENTATIONS = ("auto", "xla", "onednn")
NHWC = ("NHWC", "HWIO", "NHWC")
_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {
    "cnn_lab_onednn_conv_forward": "CnnLabOnednnConvForward",
    "cnn_lab_onednn_conv_backward": "CnnLabOnednnConvBackward",
    "cnn_lab_onednn_conv_kernel_backward": "CnnLabOnednnConvKernelBackward",
}


def check_name(implementation: str) -> None:
    """Raise ValueError unless `implementation` is one of IMPLEMENTATIONS."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"config.model.conv_implementation={implementation!r} is not one of "
            f"{', '.join(IMPLEMENTATIONS)}. Use auto (oneDNN on a one-device CPU run, else XLA)."
        )


def resolve(implementation: str, compute_dtype: str = "float32") -> str:
    """The implementation ("xla" or "onednn") that `implementation` names for this process."""
    check_name(implementation)
    if implementation == "xla":
        return "xla"
    reasons = []
    if jax.default_backend() != "cpu":
        reasons.append(f"the backend is {jax.default_backend()}, not cpu")
    if jax.device_count() != 1:
        reasons.append(
            f"the run has {jax.device_count()} devices (oneDNN's multi-threaded convolution "
            "serves a run of one CPU device: set --config.train.cpu_devices=1, one process)"
        )
    if compute_dtype != "float32":
        reasons.append(f"config.model.compute_dtype is {compute_dtype}, not float32")
    if not reasons:
        problem = onednn_problem()
        if problem:
            reasons.append(problem)
    if not reasons:
        return "onednn"
    if implementation == "onednn":
        raise ValueError(
            "config.model.conv_implementation=onednn cannot be used: " + "; ".join(reasons) + ". "
            "Fix that, or set --config.model.conv_implementation=auto to use XLA's convolution."
        )
    return "xla"


def conv_general_dilated(implementation: str) -> Callable:
    """`lax.conv_general_dilated`, or its oneDNN stand-in, for a resolved implementation."""
    return onednn_conv_general_dilated if implementation == "onednn" else lax.conv_general_dilated


def implementation_of(model) -> str:
    """The convolution ("xla" or "onednn") a model built by get_model computes with."""
    onednn = getattr(model, "conv_general_dilated", None) is onednn_conv_general_dilated
    return "onednn" if onednn else "xla"


@functools.cache
def onednn_problem() -> str | None:
    """None when the oneDNN convolution can be built and loaded, else why not."""
    try:
        _register()
    except (OSError, RuntimeError) as error:
        logging.warning("oneDNN convolution unavailable, XLA's is used: %s", error)
        return f"oneDNN could not be loaded ({error})"
    return None


def _onednn_files() -> tuple[Path, Path]:
    """(libdnnl.so.3, include dir) from the installed onednn-cpu-gomp wheels."""
    library = include = None
    for package in ("onednn-cpu-gomp", "onednn-devel-cpu-gomp"):
        try:
            files = importlib.metadata.files(package) or ()
        except importlib.metadata.PackageNotFoundError:
            files = ()
        for file in files:
            if file.name == "libdnnl.so.3":
                library = Path(file.locate()).resolve()
            if file.name == "dnnl.hpp" and file.parent.name == "dnnl":
                include = Path(file.locate()).resolve().parent.parent.parent
    if library is None or include is None:
        raise RuntimeError(
            "the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels are not installed "
            "(pip install -e . installs them on Linux x86-64)"
        )
    return library, include


def _build(rebuild: bool = False) -> Path:
    """The compiled FFI library, built into the user's cache once per source and jaxlib."""
    library, include = _onednn_files()
    compiler = shutil.which("g++") or shutil.which("c++")
    versions = (importlib.metadata.version("jaxlib"), str(library.resolve()), str(compiler))
    key = hashlib.sha256(_SOURCE.read_bytes() + repr(versions).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnn_lab"
    built = cache / f"onednn_conv_{key}.so"
    if built.exists() and not rebuild:
        return built
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) to build the oneDNN convolution")
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        partial = Path(scratch) / built.name
        command = [
            compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-I{jax.ffi.include_dir()}", f"-I{include}", str(_SOURCE), str(library),
            f"-Wl,-rpath,{library.parent}", "-o", str(partial),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"building {_SOURCE.name} failed: {result.stderr[-2000:]}")
        os.replace(partial, built)
    return built


@functools.cache
def _register() -> None:
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except OSError:  # A damaged cached build: make it again.
        library = ctypes.cdll.LoadLibrary(str(_build(rebuild=True)))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )


def _attributes(geometry: tuple) -> dict[str, np.ndarray]:
    strides, padding, dilation = geometry
    return {
        "strides": np.asarray(strides, np.int64),
        "padding": np.asarray(padding, np.int64).reshape(-1),
        "dilation": np.asarray(dilation, np.int64),
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_conv(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    strides, padding, dilation = geometry
    out = jax.eval_shape(
        lambda x, k: lax.conv_general_dilated(
            x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC
        ),
        x,
        kernel,
    )
    call = jax.ffi.ffi_call("cnn_lab_onednn_conv_forward", out, vmap_method="sequential")
    return call(x, kernel, **_attributes(geometry))


def _forward(x, kernel, geometry: tuple):
    """The output and residuals; x and kernel are CustomVJPPrimals (`symbolic_zeros`)."""
    # `perturbed` is False for an input nothing differentiates, e.g. a first layer's images:
    # its gradient, as costly as the kernel's for few input channels, is then never computed.
    out = _onednn_conv(x.value, kernel.value, geometry)
    return out, (x.value, kernel.value, x.perturbed)


def _backward(geometry: tuple, residuals: tuple, dy: jax.Array) -> tuple:
    x, kernel, input_gradient = residuals
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):  # The output feeds no loss.
        return None, None
    attributes = _attributes(geometry)
    kernel_shape = jax.ShapeDtypeStruct(kernel.shape, x.dtype)
    if not input_gradient:
        call = jax.ffi.ffi_call(
            "cnn_lab_onednn_conv_kernel_backward", kernel_shape, vmap_method="sequential"
        )
        return None, call(x, dy, **attributes)
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), kernel_shape)
    call = jax.ffi.ffi_call("cnn_lab_onednn_conv_backward", shapes, vmap_method="sequential")
    return tuple(call(x, kernel, dy, **attributes))


_onednn_conv.defvjp(_forward, _backward, symbolic_zeros=True)


def onednn_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` computed by oneDNN; lhs (N, H, W, C), rhs (KH, KW, C, O).

    Other cases (see the module docstring) go to `lax.conv_general_dilated` unchanged.
    """
    spatial = lhs.ndim - 2
    rhs_dilation = tuple(rhs_dilation or (1,) * spatial)
    taken = (
        spatial == 2
        and lhs.dtype == rhs.dtype == jnp.float32
        and preferred_element_type in (None, jnp.float32)
        and feature_group_count == batch_group_count == 1
        and all(d == 1 for d in (lhs_dilation or ()))
        and (isinstance(padding, str) or all(p >= 0 for pair in padding for p in pair))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )
    if not taken:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )  # fmt: skip
    _register()
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, window_strides, padding)
    geometry = (
        tuple(int(s) for s in window_strides),
        tuple((int(lo), int(hi)) for lo, hi in padding),
        tuple(int(d) for d in rhs_dilation),
    )
    return _onednn_conv(lhs, rhs, geometry)
