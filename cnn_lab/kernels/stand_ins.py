"""`lax.conv_general_dilated` stand-ins that run cnn_lab's CPU kernels through XLA's FFI.

Each takes the calls its kernels can compute (see `_cpu_geometry`, `_batch_minor_geometry`)
and hands the others on unchanged, and computes its own gradients (`jax.custom_vjp`). The
kernels are built and registered on a stand-in's first call that uses them (`build`). Every
FFI call is split over the devices that shard its batch (`devices.batch_parallel`), so a
data-parallel step over several CPU devices convolves each device's own images.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_lab.kernels import build, devices

NHWC = ("NHWC", "HWIO", "NHWC")
# jax.ffi's layouts run major to minor: H, W, C, then N, so 16 images share a vector.
BATCH_MINOR = (1, 2, 3, 0)
BATCH_LANES = 16


def _attributes(geometry: tuple) -> dict[str, np.ndarray]:
    strides, padding, dilation = geometry
    return {
        "strides": np.asarray(strides, np.int64),
        "padding": np.asarray(padding, np.int64).reshape(-1),
        "dilation": np.asarray(dilation, np.int64),
        "threads": np.int64(devices.threads_per_device()),
    }


def _onednn_forward_call(x: jax.Array, kernel: jax.Array, geometry: tuple) -> tuple:
    """(y,): x (N, H, W, C) convolved with kernel (KH, KW, C, O) by oneDNN."""
    strides, padding, dilation = geometry
    out = jax.eval_shape(
        lambda x, k: lax.conv_general_dilated(
            x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC
        ),
        x,
        kernel,
    )
    call = jax.ffi.ffi_call("cnn_lab_onednn_conv_forward", out, vmap_method="sequential")
    return (call(x, kernel, **_attributes(geometry)),)


def _onednn_backward_call(x: jax.Array, kernel: jax.Array, dy: jax.Array, geometry: tuple):
    """(dx, dkernel) from dy, the output's gradient, in one oneDNN call."""
    shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(kernel.shape, x.dtype))
    call = jax.ffi.ffi_call("cnn_lab_onednn_conv_backward", shapes, vmap_method="sequential")
    return tuple(call(x, kernel, dy, **_attributes(geometry)))


def _onednn_kernel_backward_call(x: jax.Array, dy: jax.Array, static: tuple) -> tuple:
    """(dkernel,) alone; `static` is (geometry, the kernel's shape)."""
    geometry, kernel_shape = static
    shape = jax.ShapeDtypeStruct(kernel_shape, x.dtype)
    call = jax.ffi.ffi_call("cnn_lab_onednn_conv_kernel_backward", shape, vmap_method="sequential")
    return (call(x, dy, **_attributes(geometry)),)


_onednn_forward = devices.batch_parallel(_onednn_forward_call, "b h w c, i j c o -> b p q o")
_onednn_backward = devices.batch_parallel(
    _onednn_backward_call, "b h w c, i j c o, b p q o -> b h w c, i j c o"
)
_onednn_kernel_backward = devices.batch_parallel(
    _onednn_kernel_backward_call, "b h w c, b p q o -> i j c o"
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _onednn_conv(x: jax.Array, kernel: jax.Array, geometry: tuple) -> jax.Array:
    return _onednn_forward(x, kernel, geometry)[0]


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
    if not input_gradient:
        return None, _onednn_kernel_backward(x, dy, (geometry, kernel.shape))[0]
    return _onednn_backward(x, kernel, dy, geometry)


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
    problem = build.problem()
    if problem:
        raise RuntimeError(
            f"{problem}. Set --config.model.conv_implementation=xla to use XLA's convolution."
        )


def _batch_minor_forward_call(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: tuple):
    """(y,): the forward kernel on batch-minor x (N, H, W, C), kernel (KH, KW, C, O), bias (O,)."""
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
    return (call(x, kernel, bias, pad_top=np.int64(top), pad_left=np.int64(left)),)


def _batch_minor_kernel_backward_call(padded: jax.Array, dy: jax.Array, kernel_shape: tuple):
    """(dkernel, dbias) from x padded by the caller and dy, batch-minor."""
    shapes = (
        jax.ShapeDtypeStruct(kernel_shape, padded.dtype),
        jax.ShapeDtypeStruct(kernel_shape[-1:], padded.dtype),
    )
    call = jax.ffi.ffi_call(
        "cnn_lab_batch_minor_conv_kernel_backward", shapes, vmap_method="sequential",
        input_layouts=(BATCH_MINOR, BATCH_MINOR),
    )  # fmt: skip
    return tuple(call(padded, dy))


# A device's shard of a batch that is not a multiple of 16 images goes to oneDNN.
def _onednn_stride_1_forward(x, kernel, bias, padding: tuple) -> tuple:
    (y,) = _onednn_forward_call(x, kernel, ((1, 1), padding, (1, 1)))
    return (y + bias.reshape(1, 1, 1, -1),)


def _onednn_stride_1_kernel_backward(padded, dy, kernel_shape: tuple) -> tuple:
    unpadded = ((1, 1), ((0, 0), (0, 0)), (1, 1))
    (dk,) = _onednn_kernel_backward_call(padded, dy, (unpadded, kernel_shape))
    return dk, jnp.sum(dy, axis=(0, 1, 2))


_batch_minor_forward_parallel = devices.batch_parallel(
    _batch_minor_forward_call, "b h w c, i j c o, o -> b p q o", BATCH_LANES,
    _onednn_stride_1_forward,
)  # fmt: skip
_batch_minor_kernel_backward = devices.batch_parallel(
    _batch_minor_kernel_backward_call, "b h w c, b p q o -> i j c o, o", BATCH_LANES,
    _onednn_stride_1_kernel_backward,
)  # fmt: skip


def _batch_minor_call(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: tuple
) -> jax.Array:
    """The forward kernel on batch-minor x (N, H, W, C), kernel (KH, KW, C, O), bias (O,)."""
    return _batch_minor_forward_parallel(x, kernel, bias, padding)[0]


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
    dk, dbias = _batch_minor_kernel_backward(padded, dy, kernel.shape)
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


@dataclasses.dataclass(frozen=True)
class StandIn:
    """A `lax.conv_general_dilated` stand-in that also adds an optional `bias` (O,).

    Calls `geometry_of` takes (it returns their geometry) run `compute(lhs, rhs, bias,
    geometry)`; the others run `fallback`, and the bias is added after it.
    """

    implementation: str  # Its name in config.model.conv_implementation and the provenance.
    geometry_of: Callable
    compute: Callable
    fallback: Callable
    takes_bias: ClassVar[bool] = True  # models.layers.Conv hands its bias to the call.

    def __call__(
        self,
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
        """`lax.conv_general_dilated(...)` plus `bias`; lhs (N, H, W, C), rhs (KH, KW, C, O)."""
        arguments = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count)  # fmt: skip
        geometry = self.geometry_of(*arguments, preferred_element_type)
        if geometry is None:
            y = self.fallback(*arguments, precision, preferred_element_type)
            return y if bias is None else y + bias.reshape(1, 1, 1, -1)
        _require_kernels()
        return self.compute(lhs, rhs, bias, geometry)


def _onednn_compute(lhs: jax.Array, rhs: jax.Array, bias, geometry: tuple) -> jax.Array:
    y = _onednn_conv(lhs, rhs, geometry)
    return y if bias is None else y + bias.reshape(1, 1, 1, -1)


def _batch_minor_compute(lhs: jax.Array, rhs: jax.Array, bias, geometry: tuple) -> jax.Array:
    bias = jnp.zeros(rhs.shape[-1:], rhs.dtype) if bias is None else bias
    return _batch_minor_conv(lhs, rhs, bias, geometry[1])


# oneDNN's convolutions; other cases (see `_cpu_geometry`) go to `lax.conv_general_dilated`.
onednn_conv_general_dilated = StandIn(
    "onednn", _cpu_geometry, _onednn_compute, lax.conv_general_dilated
)
# The batch-minor kernels take stride-1, undilated calls with N a multiple of 16; others go
# to oneDNN. They add a `bias` inside the kernels, which also sum its gradient: XLA would
# instead re-lay the whole batch-minor output gradient out to sum it.
batch_minor_conv_general_dilated = StandIn(
    "batch_minor", _batch_minor_geometry, _batch_minor_compute, onednn_conv_general_dilated
)
