"""Which convolution the models run: XLA's native one, or cnn_lab's CPU kernels.

XLA's CPU convolution keeps about one core busy and, for every kernel gradient, copies the
activations into a batch-minor layout (recomputing batch norm and ReLU on the way); that
copying took as long as the convolutions in a ResNet-20 train step. oneDNN (the library
behind PyTorch's CPU convolutions) computes the forward pass and both gradients on NHWC
arrays directly, with every core, but puts channels in its vector lanes: convolutions with
few channels (LeNet-5's 3 -> 6 -> 16) leave most lanes idle. cnn_lab's batch-minor kernels
put 16 images in each lane instead. `config.model.conv_implementation` picks:

- "xla": `lax.conv_general_dilated`, on any backend.
- "onednn": oneDNN through XLA's FFI (CPU, one device in the whole run: the FFI call is not
  partitioned over a mesh). Calls it does not take (not float32, grouped, transposed,
  negative padding, not 2-D NHWC/HWIO, an empty output) run XLA's convolution instead.
- "batch_minor": the batch-minor kernels (CPU, one device) for stride-1, undilated
  convolutions of batches that are a multiple of 16; other calls go to "onednn". XLA lays
  their activations out batch-minor and fuses the transposes into neighbouring ops, which
  pays only where every convolution is small: LeNet-5's train step ran 2.6x faster than
  with oneDNN, ResNet-20's at half the speed (352 against 657 images/s) and ConvNet's 16%
  slower (`python -m cnn_lab.benchmark --config=configs/<name>.py
  --config.model.conv_implementation=batch_minor`).
- "auto": on a float32 run of one CPU device where the kernels load, "batch_minor" for
  models whose class declares `few_channel_convolutions` (LeNet-5) on a CPU with AVX-512,
  else "onednn"; "xla" elsewhere: accelerators always get XLA's own kernels.

The C++ kernels are built on first use (see `cpu_kernels`).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_lab.models import cpu_kernels

# cnn_lab's FFI kernels: CPU only, one device in the whole run.
CPU_IMPLEMENTATIONS = ("onednn", "batch_minor")
IMPLEMENTATIONS = ("auto", "xla", *CPU_IMPLEMENTATIONS)
NHWC = ("NHWC", "HWIO", "NHWC")
# jax.ffi's layouts run major to minor: H, W, C, then N, so 16 images share a vector.
BATCH_MINOR = (1, 2, 3, 0)
BATCH_LANES = 16


def check_name(implementation: str) -> None:
    """Raise ValueError unless `implementation` is one of IMPLEMENTATIONS."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"config.model.conv_implementation={implementation!r} is not one of "
            f"{', '.join(IMPLEMENTATIONS)}. Use auto (cnn_lab's CPU kernels on a one-device CPU "
            "run, else XLA)."
        )


def resolve(implementation: str, compute_dtype: str = "float32", few_channels: bool = False) -> str:
    """The implementation ("xla", "onednn" or "batch_minor") `implementation` names here.

    `few_channels`: the model declares that all its convolutions have few channels.
    """
    check_name(implementation)
    if implementation == "xla":
        return "xla"
    reasons = []
    if jax.default_backend() != "cpu":
        reasons.append(f"the backend is {jax.default_backend()}, not cpu")
    if jax.device_count() != 1:
        reasons.append(
            f"the run has {jax.device_count()} devices (cnn_lab's multi-threaded CPU convolutions "
            "serve a run of one CPU device: set --config.train.cpu_devices=1, one process)"
        )
    if compute_dtype != "float32":
        reasons.append(f"config.model.compute_dtype is {compute_dtype}, not float32")
    if not reasons:
        problem = cpu_kernels.problem()
        if problem:
            reasons.append(problem)
    # Without AVX-512's 32 vector registers the batch-minor kernels spill: LeNet-5's train
    # step took 41 ms instead of 4 ms built for AVX2 (-march=x86-64-v3) on this AVX-512 CPU.
    if implementation == "batch_minor" and not reasons and not cpu_kernels.wide_vectors():
        reasons.append(
            "this CPU has no AVX-512, without which the batch-minor kernels run 10x slower"
        )
    if not reasons:
        if implementation == "auto":
            return "batch_minor" if few_channels and cpu_kernels.wide_vectors() else "onednn"
        return implementation
    if implementation != "auto":
        raise ValueError(
            f"config.model.conv_implementation={implementation} cannot be used: "
            + "; ".join(reasons)
            + ". Fix that, or set --config.model.conv_implementation=auto, which picks the "
            "fastest convolution this run can use."
        )
    return "xla"


def conv_general_dilated(implementation: str) -> Callable:
    """`lax.conv_general_dilated`, or a stand-in, for a resolved implementation."""
    return _FUNCTIONS[implementation]


def implementation_of(model) -> str:
    """The convolution ("xla", "onednn" or "batch_minor") a model built by get_model runs."""
    function = getattr(model, "conv_general_dilated", None)
    return next((name for name, f in _FUNCTIONS.items() if f is function), "xla")


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


def _cpu_geometry(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
    batch_group_count,
    preferred_element_type,
) -> tuple | None:
    """(strides, explicit padding, dilation) of a call the CPU kernels take, else None.

    They take float32 2-D NHWC/HWIO calls without groups, input dilation or negative
    padding, whose output is not empty.
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
        return None
    dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dilation, strict=True)]
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], dilated, window_strides, padding)
    padded = [size + lo + hi for size, (lo, hi) in zip(lhs.shape[1:3], padding, strict=True)]
    if any(size < k for size, k in zip(padded, dilated, strict=True)):
        return None  # An empty output, which XLA's convolution returns.
    return (
        tuple(int(s) for s in window_strides),
        tuple((int(lo), int(hi)) for lo, hi in padding),
        tuple(int(d) for d in rhs_dilation),
    )


def _require_kernels() -> None:
    """Registers the FFI targets, or raises with the reason they cannot be loaded."""
    problem = cpu_kernels.problem()
    if problem:
        raise RuntimeError(
            f"{problem}. Set --config.model.conv_implementation=xla to use XLA's convolution."
        )


def _batch_minor_call(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: tuple
) -> jax.Array:
    """The forward kernel on batch-minor x (N, H, W, C), kernel (KH, KW, C, O), bias (O,)."""
    (top, bottom), (left, right) = padding
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    out = jax.ShapeDtypeStruct(
        (n, h + top + bottom - kh + 1, w + left + right - kw + 1, o), x.dtype
    )
    call = jax.ffi.ffi_call(
        "cnn_lab_batch_minor_conv_forward", out, vmap_method="sequential",
        input_layouts=(BATCH_MINOR, None, None), output_layouts=BATCH_MINOR,
    )  # fmt: skip
    return call(x, kernel, bias, pad_top=np.int64(top), pad_left=np.int64(left))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_minor_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: tuple):
    return _batch_minor_call(x, kernel, bias, padding)


def _batch_minor_forward(x, kernel, bias, padding: tuple):
    """As `_forward`, for the batch-minor kernels."""
    y = _batch_minor_conv(x.value, kernel.value, bias.value, padding)
    return y, (x.value, kernel.value, x.perturbed)


def _batch_minor_backward(padding: tuple, residuals: tuple, dy: jax.Array) -> tuple:
    x, kernel, input_gradient = residuals
    if isinstance(dy, jax.custom_derivatives.SymbolicZero):
        return None, None, None
    (top, bottom), (left, right) = padding
    zero = jnp.zeros((), x.dtype)
    padded = lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    shapes = (
        jax.ShapeDtypeStruct(kernel.shape, x.dtype),
        jax.ShapeDtypeStruct(kernel.shape[-1:], x.dtype),
    )
    call = jax.ffi.ffi_call(
        "cnn_lab_batch_minor_conv_kernel_backward", shapes, vmap_method="sequential",
        input_layouts=(BATCH_MINOR, BATCH_MINOR),
    )  # fmt: skip
    dk, dbias = call(padded, dy)
    if not input_gradient:
        return None, dk, dbias
    # dx is dy convolved with the kernel flipped in space and transposed (O and C swapped),
    # padded so that every output position that read x[i] sees it again.
    kh, kw = kernel.shape[:2]
    flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
    dx_padding = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
    no_bias = jnp.zeros(x.shape[-1:], x.dtype)
    return _batch_minor_call(dy, flipped, no_bias, dx_padding), dk, dbias


_batch_minor_conv.defvjp(_batch_minor_forward, _batch_minor_backward, symbolic_zeros=True)


def _batch_minor_geometry(*arguments) -> tuple | None:
    """`_cpu_geometry` of a call the batch-minor kernels take, else None.

    They take stride 1, no dilation and a batch that is a positive multiple of 16.
    """
    geometry = _cpu_geometry(*arguments)
    batch = arguments[0].shape[0]
    if geometry is None or geometry[0] != (1, 1) or geometry[2] != (1, 1):
        return None
    return geometry if batch and batch % BATCH_LANES == 0 else None


def _stand_in(name: str, doc: str, geometry_of: Callable, compute: Callable, fallback: Callable):
    """A `lax.conv_general_dilated` stand-in that also adds an optional `bias` (O,).

    Calls `geometry_of` takes (it returns their geometry) run `compute(lhs, rhs, bias,
    geometry)`; the others run `fallback`, and the bias is added after it.
    """

    def conv_general_dilated(
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
        *,
        bias: jax.Array | None = None,
    ) -> jax.Array:
        arguments = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count)  # fmt: skip
        geometry = geometry_of(*arguments, preferred_element_type)
        if geometry is None:
            y = fallback(*arguments, precision, preferred_element_type)
            return y if bias is None else y + bias.reshape(1, 1, 1, -1)
        _require_kernels()
        return compute(lhs, rhs, bias, geometry)

    conv_general_dilated.__name__ = conv_general_dilated.__qualname__ = name
    conv_general_dilated.__doc__ = doc
    return conv_general_dilated


def _onednn_compute(lhs: jax.Array, rhs: jax.Array, bias, geometry: tuple) -> jax.Array:
    y = _onednn_conv(lhs, rhs, geometry)
    return y if bias is None else y + bias.reshape(1, 1, 1, -1)


def _batch_minor_compute(lhs: jax.Array, rhs: jax.Array, bias, geometry: tuple) -> jax.Array:
    bias = jnp.zeros(rhs.shape[-1:], rhs.dtype) if bias is None else bias
    return _batch_minor_conv(lhs, rhs, bias, geometry[1])


onednn_conv_general_dilated = _stand_in(
    "onednn_conv_general_dilated",
    """`lax.conv_general_dilated` computed by oneDNN; lhs (N, H, W, C), rhs (KH, KW, C, O).

    Other cases (see the module docstring) go to `lax.conv_general_dilated` unchanged.
    """,
    _cpu_geometry,
    _onednn_compute,
    lax.conv_general_dilated,
)
batch_minor_conv_general_dilated = _stand_in(
    "batch_minor_conv_general_dilated",
    """`lax.conv_general_dilated` computed batch-minor; lhs (N, H, W, C), rhs (KH, KW, C, O).

    Takes stride-1, undilated calls with N a multiple of 16; others go to
    `onednn_conv_general_dilated`. A `bias` is added inside the kernels, which also sum
    its gradient: XLA would instead re-lay the whole batch-minor output gradient out to sum
    it, which took as long as LeNet-5's first convolution.
    """,
    _batch_minor_geometry,
    _batch_minor_compute,
    onednn_conv_general_dilated,
)


def conv_with_bias(
    function: Callable, x: jax.Array, kernel: jax.Array, bias: jax.Array, strides, padding
) -> jax.Array:
    """x (N, H, W, C) convolved with kernel (KH, KW, C, O) by `function`, plus bias (O,).

    cnn_lab's stand-ins take the bias into their call (the batch-minor kernels fuse it).
    """
    if any(function is _FUNCTIONS[name] for name in CPU_IMPLEMENTATIONS):
        return function(x, kernel, strides, padding, dimension_numbers=NHWC, bias=bias)
    return function(x, kernel, strides, padding, dimension_numbers=NHWC) + bias.reshape(1, 1, 1, -1)


_FUNCTIONS = {
    "xla": lax.conv_general_dilated,
    "onednn": onednn_conv_general_dilated,
    "batch_minor": batch_minor_conv_general_dilated,
}
