"""Which convolution a conv model runs: the one place `auto` is resolved (see the package)."""

import functools
from collections.abc import Callable

import jax
from jax import lax

from cnn_lab.kernels import build, stand_ins

# cnn_lab's FFI kernels: CPU only, one device in the whole run.
CPU_IMPLEMENTATIONS = ("onednn", "batch_minor")
IMPLEMENTATIONS = ("auto", "xla", *CPU_IMPLEMENTATIONS)
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
            f"{', '.join(IMPLEMENTATIONS)}. Use auto (cnn_lab's CPU kernels on a one-device CPU "
            "run, else XLA)."
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


def runs_kernels_on_one_device(implementation: str, compute_dtype: str) -> bool:
    """Whether a run of `implementation` on one CPU device would use the kernels.

    For choosing the CPU device count before JAX starts: it looks only at the names and at
    what is installed, and builds nothing. An explicit CPU choice counts even where it cannot
    run: `get_model` explains what stands in the way.
    """
    if implementation in CPU_IMPLEMENTATIONS:
        return True
    return (
        implementation == "auto"
        and _choose("auto", compute_dtype, False, (), build.missing) != "xla"
    )


@functools.cache
def _process_obstacles() -> tuple[str, ...]:
    """Why this process's backend and devices cannot run the kernels; looked at once."""
    reasons = []
    if jax.default_backend() != "cpu":
        reasons.append(f"the backend is {jax.default_backend()}, not cpu")
    if jax.device_count() != 1:
        reasons.append(
            f"the run has {jax.device_count()} devices (cnn_lab's multi-threaded CPU convolutions "
            "serve a run of one CPU device: set --config.train.cpu_devices=1, one process)"
        )
    return tuple(reasons)


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
