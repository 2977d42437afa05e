"""The C++ convolution kernels for CPUs: built on first use, loaded, registered with XLA's FFI.

Two files beside this one make one library: onednn_conv.cc (oneDNN's convolutions on NHWC
arrays) and batch_minor_conv.cc (few-channel convolutions with the batch in the vector
lanes). g++ compiles them for this machine's CPU (-march=native) against the pinned
`onednn-devel-cpu-gomp` wheel into ~/.cache/cnn_lab, keyed by the sources, jaxlib, oneDNN,
the compiler and the CPU's instruction sets, so a home directory shared by different
machines never loads a build made for another CPU.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
from absl import logging

_SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("onednn_conv.cc", "batch_minor_conv.cc")
)
_TARGETS = {
    "cnn_lab_onednn_conv_forward": "CnnLabOnednnConvForward",
    "cnn_lab_onednn_conv_backward": "CnnLabOnednnConvBackward",
    "cnn_lab_onednn_conv_kernel_backward": "CnnLabOnednnConvKernelBackward",
    "cnn_lab_batch_minor_conv_forward": "CnnLabBatchMinorConvForward",
    "cnn_lab_batch_minor_conv_kernel_backward": "CnnLabBatchMinorConvKernelBackward",
}


@functools.cache
def problem() -> str | None:
    """None when the kernels can be built and loaded (then they are registered), else why not."""
    try:
        _register()
    except (OSError, RuntimeError) as error:
        logging.warning("cnn_lab's CPU convolutions unavailable, XLA's is used: %s", error)
        return f"cnn_lab's CPU convolutions could not be loaded ({error})"
    return None


def missing() -> str | None:
    """None when the wheels and a compiler the kernels need are installed, else what is not.

    Cheap (it builds nothing), for decisions made before JAX starts its backends.
    """
    try:
        _onednn_files()
        _compiler()
    except RuntimeError as error:
        return f"cnn_lab's CPU convolutions cannot be built ({error})"
    return None


def _compiler() -> str:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) to build the CPU convolutions")
    return compiler


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


def _cpu_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ("model name", "flags", ...); {} off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    pairs = (line.split(":", 1) for line in first.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def _cpu_features() -> str:
    """This CPU's instruction-set flags (Linux), else its architecture name."""
    return _cpu_fields().get("flags", platform.machine())


def cpu() -> dict:
    """This CPU's model, logical core count, cache and vector extensions: what decides how XLA,
    oneDNN and these kernels vectorise and block their loops, hence the last bits of a run's
    floating-point results."""
    fields = _cpu_fields()
    vector = ("sse4", "avx", "fma", "amx")
    return {
        "model": fields.get("model name", platform.processor() or platform.machine()),
        "family_model": f"{fields.get('cpu family', '?')}-{fields.get('model', '?')}",
        "cores": os.cpu_count(),
        "cache": fields.get("cache size"),
        "extensions": sorted(f for f in fields.get("flags", "").split() if f.startswith(vector)),
    }


def wide_vectors() -> bool:
    """Whether this CPU has AVX-512, whose 32 vector registers the batch-minor kernels fill."""
    return "avx512f" in _cpu_features().split()


def compile_command(output: Path, march: str = "native") -> list[str]:
    """The g++ command that builds the library into `output` for CPU `march`."""
    library, include = _onednn_files()
    compiler = _compiler()
    return [
        compiler, "-O3", f"-march={march}", "-std=c++20", "-fopenmp", "-shared", "-fPIC", "-w",
        f"-I{jax.ffi.include_dir()}", f"-I{include}", *map(str, _SOURCES), str(library),
        f"-Wl,-rpath,{library.parent}", "-o", str(output),
    ]  # fmt: skip


def _build(rebuild: bool = False) -> Path:
    """The compiled library, built into the user's cache once per source, jaxlib and CPU."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnn_lab"
    command = compile_command(cache / "placeholder")  # The output path is not part of the key.
    compiler_version = subprocess.run([command[0], "--version"], capture_output=True, text=True)
    versions = (
        importlib.metadata.version("jaxlib"), command[:-1], compiler_version.stdout, _cpu_features()
    )  # fmt: skip
    sources = b"".join(source.read_bytes() for source in _SOURCES)
    key = hashlib.sha256(sources + repr(versions).encode()).hexdigest()[:16]
    built = cache / f"cpu_conv_{key}.so"
    if built.exists() and not rebuild:
        return built
    cache.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        partial = Path(scratch) / built.name
        result = subprocess.run([*command[:-1], str(partial)], capture_output=True, text=True)
        if result.returncode:
            names = " and ".join(source.name for source in _SOURCES)
            raise RuntimeError(f"building {names} failed: {result.stderr[-2000:]}")
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
