"""Pieces shared by every model: activations and pooling chosen by name, init, stochastic depth."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
}
NHWC = ("NHWC", "HWIO", "NHWC")
# The collection models sow auxiliary scalars into (`self.sow(METRICS, name, x)`); the steps
# log each by name.
METRICS = "metrics"


def _tiles(x: jax.Array, window: tuple[int, int]) -> list[jax.Array]:
    """The kh * kw strided views (B, H / kh, W / kw, C) of x (B, H, W, C), window row-major."""
    kh, kw = window
    return [x[:, i::kh, j::kw, :] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    return functools.reduce(jnp.maximum, _tiles(x, window))


def _tiled_max_pool_forward(x: jax.Array, window: tuple[int, int]):
    out = _tiled_max_pool(x, window)
    return out, (x, out)


def _tiled_max_pool_backward(window: tuple[int, int], residuals: tuple, dy: jax.Array):
    x, out = residuals
    # Each window's gradient goes to its first maximum in row-major order, as XLA's
    # select-and-scatter does for nn.max_pool, so ties (e.g. ReLU zeros) match exactly.
    taken = jnp.zeros(out.shape, bool)
    parts = []
    for tile in _tiles(x, window):
        hit = (tile == out) & ~taken
        parts.append(jnp.where(hit, dy, jnp.zeros_like(dy)))
        taken = taken | hit
    b, h, w, c = out.shape
    kh, kw = window
    dx = jnp.stack(parts).reshape(kh, kw, b, h, w, c).transpose(2, 3, 0, 4, 1, 5)
    return (dx.reshape(x.shape),)


_tiled_max_pool.defvjp(_tiled_max_pool_forward, _tiled_max_pool_backward)


def _windows_tile(shape: tuple[int, ...], window: tuple[int, ...], strides, padding) -> bool:
    """Whether 2-D windows over (B, H, W, C) `shape` cover it exactly, without overlap."""
    unpadded = padding == "VALID" or (
        not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)
    )
    return (
        len(shape) == 4
        and len(window) == 2
        and tuple(strides or (1, 1)) == window
        and unpadded
        and shape[1] % window[0] == 0
        and shape[2] % window[1] == 0
    )


def max_pool(
    x: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
) -> jax.Array:
    """`nn.max_pool` of x (B, H, W, C) -> (B, H', W', C), with the same values and gradients.

    Windows that tile x (window == strides, no padding, H and W divisible by the window)
    are computed from strided slices: XLA's CPU backend lowers nn.max_pool's gradient
    (select-and-scatter) to an index-tracking reduce-window and a scatter, several times
    slower than the elementwise selects used here.
    """
    window = tuple(window_shape)
    if _windows_tile(x.shape, window, strides, padding):
        return _tiled_max_pool(x, window)
    return nn.max_pool(x, window, strides=strides, padding=padding)


POOLINGS: dict[str, Callable[..., jax.Array]] = {"max": max_pool, "avg": nn.avg_pool}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(
            f"Unknown {what} {name!r}. Known {what}s: {', '.join(sorted(table))}. "
            f"Set config.model.{what} to one of them."
        )
    return table[name]


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` (relu, tanh, sigmoid, gelu, silu, elu)."""
    return _lookup(ACTIVATIONS, name, "activation")


def get_pooling(name: str) -> Callable[..., jax.Array]:
    """The pooling function called `name` (max or avg), with flax.linen's signature."""
    return _lookup(POOLINGS, name, "pooling")


def dense_names(first: int, count: int) -> tuple[str, ...]:
    """Names of `count` hidden dense layers numbered on from `first`: "fc6", "fc7" for (6, 2)."""
    return tuple(f"fc{first + j}" for j in range(count))


def check_removal(remove: Sequence[str], removable: Sequence[str], model: str) -> None:
    """Raise ValueError unless `remove` names each of some `removable` layers at most once."""
    unknown = [name for name in remove if name not in removable]
    if not unknown and len(set(remove)) == len(remove):
        return
    problem = f"names no layer of {model}: {unknown}" if unknown else "repeats a name"
    example = f"--config.model.remove='(\"{removable[-1]}\",)', or " if removable else ""
    raise ValueError(
        f"config.model.remove={tuple(remove)!r} {problem}. The removable layers are "
        f"{', '.join(removable) or 'none'} (the output layer always stays). Remove some of "
        f"them, e.g. {example}none: --config.model.remove='()'."
    )


class Conv(nn.Module):
    """A 2-D convolution with bias on NHWC input: `nn.Conv`'s parameters (kernel HWIO, bias),
    names, initialisers and result, with the bias handed to a convolution that takes it (the
    batch-minor CPU kernels fuse it and its gradient).

    Attributes:
      features: output channels.
      kernel_size: (KH, KW).
      strides: an int or (SH, SW).
      padding: "SAME", "VALID", an int or ((top, bottom), (left, right)), as nn.Conv (whose
        "CIRCULAR" and "CAUSAL" no model uses, and this module does not take).
      dtype: activations' dtype (None: the inputs'); parameters stay float32.
      convolution: `lax.conv_general_dilated` or a stand-in with its signature; one whose
        `takes_bias` is true also takes `bias=` (see `cnn_lab.kernels`).
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence = "SAME"
    dtype: Any = None
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    convolution: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """The convolution (B, H', W', features) of x (B, H, W, C)."""
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        padding = nn.linear.canonicalize_padding(self.padding, 2)
        if getattr(self.convolution, "takes_bias", False):
            return self.convolution(x, kernel, strides, padding, dimension_numbers=NHWC, bias=bias)
        y = self.convolution(x, kernel, strides, padding, dimension_numbers=NHWC)
        return y + bias.reshape(1, 1, 1, -1)


def adaptive_avg_pool(x: jax.Array, output_size: Sequence[int]) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d: x (B, H, W, C) -> (B, OH, OW, C), output bin i averaging
    input rows floor(i * H / OH) to ceil((i + 1) * H / OH) - 1 (columns likewise).

    torchvision's VGG and AlexNet pool their last map to 7x7 and 6x6 with it, so their first
    dense layer fits any input size; at 224x224 the map already has that size and passes as is.
    """
    if tuple(x.shape[1:3]) == tuple(output_size):
        return x

    def bins(size: int, out: int) -> np.ndarray:  # (out, size): each row averages one bin.
        weights = np.zeros((out, size), np.float32)
        for i in range(out):
            start, end = i * size // out, -(-(i + 1) * size // out)
            weights[i, start:end] = 1.0 / (end - start)
        return weights

    rows, cols = bins(x.shape[1], output_size[0]), bins(x.shape[2], output_size[1])
    return jnp.einsum("bhwc,ih,jw->bijc", x, rows.astype(x.dtype), cols.astype(x.dtype))


def at_least_float32(x: jax.Array) -> jax.Array:
    """x (any shape) cast up to float32 when narrower (bfloat16); float32 and float64 stay."""
    return x if jnp.finfo(x.dtype).bits >= 32 else x.astype(jnp.float32)


def standard_promotion(norm: Callable[..., nn.Module]) -> Callable[..., Callable]:
    """`norm`, a maker of flax norm layers (BatchNorm, GroupNorm), whose layers run under
    standard dtype promotion, so that they also run where it is strict.

    flax's norms promote their dtype with float32 and subtract float32 statistics from a
    bfloat16 input: implicit promotions that strict promotion refuses.
    """

    def make(*args, **kwargs) -> Callable:
        layer = norm(*args, **kwargs)  # Made here: named and bound as usual.

        def apply(x: jax.Array, **call_kwargs) -> jax.Array:
            with jax.numpy_dtype_promotion("standard"):
                return layer(x, **call_kwargs)

        return apply

    return make


# He et al. (2015) initialisation for convolutions followed by ReLU, as the ResNet paper and
# torchvision use; flax's default (LeCun normal) halves the signal variance at every layer.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

DROP_MODES = ("batch", "sample")


def linear_drop_rates(rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth drop probabilities of blocks 1..L by Huang et al.'s linear decay rule.

    Block l of L is dropped with probability `rate * l / L` (survival p_l = 1 - l/L (1 - p_L)
    in the paper, with p_L = 1 - rate): the input (l = 0) always survives and the last block
    is dropped with probability `rate`. timm instead spreads `linspace(0, rate, L)`, so its
    first block is never dropped; the two differ by at most `rate / L` per block.
    """
    return [rate * block / num_blocks for block in range(1, num_blocks + 1)]


class StochasticDepth(nn.Module):
    """Drop a residual branch during training (Huang et al., 2016, "Deep networks with stochastic depth").

    Inverted scaling: a kept branch is divided by its survival probability 1 - rate during
    training, so its expected value is the branch itself and evaluation runs the plain
    network unchanged. The paper instead multiplies by the survival probability at test time;
    scaling in training keeps every evaluation, export and checkpoint free of stochastic-depth
    code and lets the rate change between runs without touching the evaluated network.

    Attributes:
      rate: probability of dropping the branch, in [0, 1).
      mode: "batch" draws one Bernoulli per call, dropping the branch for the whole mini-batch
        as in the paper; "sample" draws one per example, as timm's `drop_path`.
    """

    rate: float
    mode: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """The branch x (B, ...) kept and rescaled, or zeroed; x itself when not training."""
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(
                f"Stochastic depth rate {self.rate} must be in [0, 1); "
                "lower config.model.stochastic_depth_rate."
            )
        if self.mode not in DROP_MODES:
            raise ValueError(
                f"Unknown stochastic depth mode {self.mode!r}. Known modes: {', '.join(DROP_MODES)}. "
                "Set config.model.stochastic_depth_mode to one of them."
            )
        # Returning early at rate 0 makes the plain network bit-identical and needs no RNG.
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (1,) * x.ndim if self.mode == "batch" else (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("stochastic_depth"), keep, shape)
        # `where` rather than a multiply, so a non-finite dropped branch cannot leak NaNs.
        return jnp.where(mask, x / keep, jnp.zeros_like(x))
