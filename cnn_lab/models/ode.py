"""Neural-ODE blocks on diffrax: ODE-Net (Chen et al., 2018) and ResNets with ODE stages.

The solve itself (solvers, step control, adjoints, statistics) is `ode_solve`, its settings
`ode_config`; here are the vector field, the block that integrates it, and the models
around it.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_lab.models.layers import (
    METRICS,
    Conv,
    StochasticDepth,
    at_least_float32,
    get_activation,
    standard_promotion,
)
from cnn_lab.models.ode_config import SolverConfig
from cnn_lab.models.resnet import (
    ResidualBlock,
    conv_and_norm,
    head,
    layout,
    residual_stage,
    stem,
)


def _groups(features: int, max_groups: int = 32) -> int:
    """Chen et al.'s GroupNorm(min(32, C)), made to divide C for any width."""
    return math.gcd(max_groups, features)


class Conv3x3(nn.Module):
    """A 3x3 convolution, stride 1, zero padding 1, with bias: nn.Conv's parameters and init.

    `im2col=True` computes it as one matmul of the 9 shifted copies of the input with the
    kernel. Inside a while loop (diffrax's solve and backward pass) XLA:CPU computes the
    kernel gradient of a native convolution many times slower than the same convolution
    unrolled; as a matmul it is fast (timings in docs/cpu_kernels.md). `im2col=False` uses
    `lax.conv_general_dilated` (faster outside loops, and the better choice on GPU and TPU).
    Both read the same parameters.
    """

    features: int
    im2col: bool = True
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, C) -> (B, H, W, features)."""
        channels = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (3, 3, channels, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.im2col:
            height, width = x.shape[1:3]
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # (B, H + 2, W + 2, C)
            shifts = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
            columns = jnp.concatenate(shifts, axis=-1)  # (B, H, W, 9 C), (i, j, c) order
            y = columns @ kernel.reshape(9 * channels, self.features)
        else:
            dims = ("NHWC", "HWIO", "NHWC")
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims
            )
        return y + bias.reshape(1, 1, 1, self.features)


class ODEFunc(nn.Module):
    """The vector field f(h, t) of Chen et al.'s ODE-Net: shape-preserving, (B, H, W, C).

    norm, act, conv3x3([t, h]), norm, act, conv3x3([t, h]), norm: each conv sees the time as
    one extra constant input channel (their `ConcatConv2d`); norms are GroupNorm(min(32, C)),
    which unlike BatchNorm keeps no state, so f is a pure function of (params, h, t).
    `time_channel=False` drops the time input: then h + f(h) is a pre-activation residual
    block, Chen et al.'s ResNet baseline. `im2col`: see Conv3x3.
    """

    features: int
    activation: str = "relu"
    time_channel: bool = True
    im2col: bool = True
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.

    @nn.compact
    def __call__(self, h: jax.Array, t: jax.Array) -> jax.Array:
        """dh/dt (B, H, W, C) at state h (B, H, W, C) and time t ()."""
        act = get_activation(self.activation)
        norm = standard_promotion(
            functools.partial(nn.GroupNorm, num_groups=_groups(self.features), dtype=self.dtype)
        )

        def conv(y: jax.Array, name: str) -> jax.Array:
            if self.time_channel:
                tt = jnp.full((*y.shape[:-1], 1), t, y.dtype)  # (B, H, W, 1)
                y = jnp.concatenate([tt, y], axis=-1)  # (B, H, W, C + 1)
            return Conv3x3(self.features, self.im2col, self.dtype, name=name)(y)

        y = conv(act(norm(name="norm1")(h)), "conv1")
        y = conv(act(norm(name="norm2")(y)), "conv2")
        return norm(name="norm3")(y)


# Metrics the ODE block sows that must stay 0, and what to do when one does not.
METRIC_WARNINGS = {
    "ode_max_steps_reached": "an ODE solve reached max_steps before t1; raise "
    "config.model.max_steps or loosen config.model.rtol/atol.",
}


class ODEBlock(nn.Module):
    """h(t1) where h(t0) = x and dh/dt = f(h, t; theta), f an ODEFunc of x's width.

    f's parameters are one variable of this block, created with f's own `init`, and go into
    the solve as diffrax's `args`: the vector field is the pure `f.apply(args, h, t)`, so the
    block works under jit, grad, both adjoints and the sharded train step. Sows the solver
    statistics of `solve` into the "metrics" collection as `ode_<name>` scalars.
    """

    solver_config: SolverConfig
    activation: str = "relu"
    im2col: bool = True
    dtype: Any = None  # f's dtype (None: the input's); the state is at least float32.

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x (B, H, W, C) -> h(t1) (B, H, W, C), in x's dtype."""
        del train  # GroupNorm: the same in training and evaluation.
        # Unbound (parent=None): a definition whose `apply` is a pure function of its params.
        func = ODEFunc(
            x.shape[-1], self.activation, im2col=self.im2col, dtype=self.dtype, parent=None
        )
        # The solver's state, time and error control stay float32 (or wider) whatever f
        # computes in: bfloat16's 8-bit mantissa is coarser than the default tolerances (1e-3).
        h0 = at_least_float32(x)
        t0 = jnp.zeros((), h0.dtype)
        params = self.param("func", lambda rng: func.init(rng, h0[:1], t0)["params"])

        def vector_field(t, h, params):
            return func.apply({"params": params}, h, t).astype(h.dtype)

        from cnn_lab.models import ode_solve  # Here: only ODE models pay diffrax's import.

        h, stats = ode_solve.solve(vector_field, h0, params, self.solver_config)
        for name, value in stats.items():
            self.sow(METRICS, f"ode_{name}", value)
        return h.astype(x.dtype)


class SolverFields(nn.Module):
    """The solver fields of a model with ODE blocks (keyword-only), integrating over [0, t1].

    Their meaning and defaults are SolverConfig's; `solver_config()` gathers them.
    """

    _: dataclasses.KW_ONLY
    solver: str = SolverConfig.solver
    steps: int = SolverConfig.steps
    rtol: float = SolverConfig.rtol
    atol: float = SolverConfig.atol
    max_steps: int = SolverConfig.max_steps
    adjoint: str = SolverConfig.adjoint
    checkpoints: int | None = SolverConfig.checkpoints
    t1: float = SolverConfig.t1

    def solver_config(self) -> SolverConfig:
        """These fields as the solve's configuration (t0 = 0)."""
        names = {f.name for f in dataclasses.fields(SolverConfig)} & {
            f.name for f in dataclasses.fields(self)
        }
        return SolverConfig(**{name: getattr(self, name) for name in names})


class ODENet(SolverFields):
    """ODE-Net (Chen et al., 2018, "Neural ordinary differential equations"), for MNIST-like input.

    conv3x3 (no padding), norm, act, conv4x4/2, norm, act, conv4x4/2 -> (B, 6, 6, width) for
    28x28 input; one ODEBlock over [0, t1]; norm, act, global average pooling, dense. Norms
    are GroupNorm(min(32, width)). With width 64 it has 0.21M parameters (the paper: 0.22M).

    `residual_blocks=n > 0` replaces the ODE block by n residual blocks h + f(h) of the same
    f without time (the paper's ResNet baseline has 6): a ResNet of matching width whose
    "NFE" is n. Solver fields: SolverFields; `im2col`: see Conv3x3.
    """

    num_classes: int
    width: int = 64
    activation: str = "relu"
    im2col: bool = True
    residual_blocks: int = 0
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    # The stem and downsampling convs' (set from conv_implementation); ODE blocks keep Conv3x3.
    convolution: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        act = get_activation(self.activation)
        norm = standard_promotion(
            functools.partial(nn.GroupNorm, num_groups=_groups(self.width), dtype=self.dtype)
        )
        conv = functools.partial(
            Conv,
            self.width,
            dtype=self.dtype,
            convolution=self.convolution,
        )
        x = conv((3, 3), padding="VALID", name="conv1")(x)  # (B, 26, 26, 64)
        x = act(norm(name="norm1")(x))
        x = conv((4, 4), 2, padding=1, name="conv2")(x)  # (B, 13, 13, 64)
        x = act(norm(name="norm2")(x))
        x = conv((4, 4), 2, padding=1, name="conv3")(x)  # (B, 6, 6, 64)
        if self.residual_blocks:
            for i in range(self.residual_blocks):
                f = ODEFunc(
                    self.width,
                    self.activation,
                    False,
                    self.im2col,
                    self.dtype,
                    name=f"block{i + 1}",
                )
                x = x + f(x, jnp.zeros((), x.dtype))
        else:
            ode = ODEBlock(
                self.solver_config(), self.activation, self.im2col, self.dtype, name="ode"
            )
            x = ode(x, train=train)
        x = act(norm(name="final_norm")(x))
        return head(x, self.num_classes, self.dtype)


class ODEResNet(SolverFields):
    """A CIFAR ResNet (He et al., 2016) whose stages in `ode_stages` (1-based) are ODE blocks.

    Built from cnn_lab's `ResNet(family="cifar")` blocks, with its layout and names
    (post-activation, option A shortcuts): stem conv3x3 16*width, three stages of
    (depth - 2) / 6 basic blocks of 16/32/64 * width channels, global average pooling, dense.
    An ODE stage keeps its downsampling first block (stages 2 and 3), which changes the shape,
    and replaces its shape-preserving blocks by one ODEBlock of the stage's width (for stage
    1: the whole stage). `ode_stages=()` is exactly `ResNet(family="cifar")`. Solver fields:
    SolverFields; `im2col`: see Conv3x3.
    """

    num_classes: int
    depth: int = 20
    width: float = 1.0
    ode_stages: tuple[int, ...] = (2,)
    activation: str = "relu"
    im2col: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None  # Activations' dtype (None: the inputs'); parameters stay float32.
    # The stem and downsampling convs' (set from conv_implementation); ODE blocks keep Conv3x3.
    convolution: Callable = lax.conv_general_dilated

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits (B, num_classes) for images x (B, H, W, C)."""
        _, stage_sizes, stem_width = layout("cifar", self.depth, self.width)
        if not set(self.ode_stages) <= {1, 2, 3}:
            raise ValueError(
                f"config.model.ode_stages={self.ode_stages} must name stages among 1, 2, 3."
            )
        act = get_activation(self.activation)
        conv, norm = conv_and_norm(self, train)
        x = stem(x, stem_width, family="cifar", preactivation=False, conv=conv, norm=norm, act=act)
        block = functools.partial(
            ResidualBlock,
            bottleneck=False,
            shortcut="A",
            preactivation=False,
            zero_init_last=False,
            conv=conv,
            norm=norm,
            act=act,
        )
        for stage, num_blocks in enumerate(stage_sizes, start=1):
            ode = stage in self.ode_stages
            # An ODE stage keeps only the block that changes the shape (none in stage 1).
            kept = (1 if stage > 1 else 0) if ode else num_blocks
            filters = stem_width * 2 ** (stage - 1)
            no_drop = [functools.partial(StochasticDepth, 0.0)] * kept
            x = residual_stage(x, stage, filters, block, no_drop, train=train)
            if ode:
                name = f"stage{stage}_ode"
                ode_block = ODEBlock(
                    self.solver_config(), self.activation, self.im2col, self.dtype, name=name
                )
                x = ode_block(x, train=train)  # (B, H', W', filters)
        return head(x, self.num_classes, self.dtype)
