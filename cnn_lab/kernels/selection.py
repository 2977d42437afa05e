"""Which convolution a conv model runs: the one place `auto` is resolved (see the package)."""

import functools
from collections.abc import Callable

import jax
from jax import lax

from cnn_lab.kernels import build, stand_ins

# cnn_lab's FFI kernels: CPU only, on any number of devices and processes.
CPU_IMPLEMENTATIONS = ("onednn", "batch_minor")
IMPLEMENTATIONS = ("auto", "xla", *CPU_IMPLEMENTATIONS)
# The CPU devices a run of the kernels splits into when config.train.cpu_devices is 0: one
# device, whose oneDNN calls use every core. With N devices each call uses 1/N of the cores
# and the devices convolve their shards side by side (`devices`); compare with
# `python -m cnn_lab.benchmark --config=configs/<name>.py --config.train.cpu_devices=N`.
# Measured on 2 cores (docs/cpu_kernels.md): 1 device trains LeNet-5 and the ConvNet 22%
# faster than 2; 2 devices train ResNet-20 7% faster with twice the peak memory.
KERNEL_CPU_DEVICES = 1
_CONVOLUTIONS = {
    "xla": lax.conv_general_dilated,
    "onednn": stand_ins.onednn_conv_general_dilated,
    "batch_minor": stand_ins.batch_minor_conv_general_dilated,
}


def check_name(implementation: str) -> None:
    """Raise ValueError unless `implementation` is one of IMPLEMENTATIONS."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"config.model.conv_implementation={implementation!r} is not one of "
            f"{', '.join(IMPLEMENTATIONS)}. Use auto (cnn_lab's CPU kernels on a CPU run, else "
            "XLA)."
        )


def convolution(implementation: str) -> Callable:
    """`lax.conv_general_dilated`, or a stand-in, for a resolved implementation."""
    return _CONVOLUTIONS[implementation]


def select(
    implementation: str, compute_dtype: str = "float32", few_channels: bool = False
) -> Callable:
    """The convolution `implementation` names for a model in this process (see `resolve`)."""
    return convolution(resolve(implementation, compute_dtype, few_channels))


def resolve(implementation: str, compute_dtype: str = "float32", few_channels: bool = False) -> str:
    """The implementation ("xla", "onednn" or "batch_minor") `implementation` names here.

    `few_channels`: the model declares that all its convolutions have few channels. The
    process (backend, devices) is looked at once; the kernels are built at the first
    resolution that can use them.
    """
    check_name(implementation)
    if implementation == "xla":
        return "xla"
    return _choose(implementation, compute_dtype, few_channels, _process_obstacles(), build.problem)


def cpu_devices(implementation: str, compute_dtype: str) -> int:
    """The CPU device count for config.train.cpu_devices=0: KERNEL_CPU_DEVICES where a CPU run
    of `implementation` would use the kernels, else 0 (one device per core, for XLA's).

    For choosing the count before JAX starts: it looks only at the names and at what is
    installed, and builds nothing. An explicit CPU choice counts even where it cannot run:
    `get_model` explains what stands in the way.
    """
    kernels = implementation in CPU_IMPLEMENTATIONS or (
        implementation == "auto"
        and _choose("auto", compute_dtype, False, (), build.missing) != "xla"
    )
    return KERNEL_CPU_DEVICES if kernels else 0


@functools.cache
def _process_obstacles() -> tuple[str, ...]:
    """Why this process's backend cannot run the kernels; looked at once."""
    if jax.default_backend() != "cpu":
        return (f"the backend is {jax.default_backend()}, not cpu",)
    return ()


def _choose(
    implementation: str,
    compute_dtype: str,
    few_channels: bool,
    obstacles: tuple[str, ...],
    problem: Callable[[], str | None],
) -> str:
    """The rule behind `resolve`: `obstacles` from the process, `problem()` the kernels'."""
    reasons = list(obstacles)
    if compute_dtype != "float32":
        reasons.append(f"config.model.compute_dtype is {compute_dtype}, not float32")
    if not reasons and (kernels_problem := problem()):
        reasons.append(kernels_problem)
    # Without AVX-512's 32 vector registers the batch-minor kernels spill registers.
    if implementation == "batch_minor" and not reasons and not build.wide_vectors():
        reasons.append(
            "this CPU has no AVX-512, without which the batch-minor kernels run 10x slower"
        )
    if not reasons:
        if implementation == "auto":
            return "batch_minor" if few_channels and build.wide_vectors() else "onednn"
        return implementation
    if implementation != "auto":
        raise ValueError(
            f"config.model.conv_implementation={implementation} cannot be used: "
            + "; ".join(reasons)
            + ". Fix that, or set --config.model.conv_implementation=auto, which picks the "
            "fastest convolution this run can use."
        )
    return "xla"
