"""Neural-ODE blocks on diffrax: ODE-Net (Chen et al., 2018) and ResNets with ODE stages."""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn_lab.models.layers import Conv, StochasticDepth, get_activation
from cnn_lab.models.resnet import ResidualBlock, conv_and_norm

PyTree = Any
# diffrax's signature: vector_field(t, y, args) -> dy/dt, a pure function of its arguments.
VectorField = Callable[[jax.Array, PyTree, PyTree], PyTree]


class RK4(diffrax.AbstractERK):
    """The classic fourth-order Runge-Kutta method (Kutta, 1901), 4 stages per step.

    diffrax has no classic RK4; this is its Butcher tableau on diffrax's explicit RK
    machinery. It has no embedded error estimate (`b_error` is zero), so it is for fixed
    steps only.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        c=np.array([0.5, 0.5, 1.0]),
    )
    interpolation_cls: ClassVar[Callable[..., diffrax.AbstractLocalInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        del terms
        return 4


# Fixed steps of (t1 - t0) / steps; adaptive steps from an embedded error estimate (PID).
FIXED_STEP_SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "ralston": diffrax.Ralston,
    "rk4": RK4,
}
ADAPTIVE_SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "bosh3": diffrax.Bosh3,
    "dopri5": diffrax.Dopri5,
    "tsit5": diffrax.Tsit5,
}
# "backprop": differentiate through the solver's operations (diffrax's
# RecursiveCheckpointAdjoint); "adjoint": solve the adjoint ODE backwards in time (Chen et al.'s
# method, diffrax's BacksolveAdjoint): O(1) memory in the number of steps, gradients exact
# only up to the tolerance of the backward solve.
ADJOINTS = ("backprop", "adjoint")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """How to integrate dh/dt = f(t, h) from t0 to t1. Every field is static (it shapes the trace).

    Attributes:
      solver: a key of FIXED_STEP_SOLVERS or ADAPTIVE_SOLVERS.
      steps: fixed-step solvers: number of equal steps over [t0, t1]; adaptive solvers: the
        first step tried is (t1 - t0) / steps, later ones come from the PID controller.
      rtol, atol: adaptive solvers: relative and absolute tolerance of the PID controller.
      max_steps: adaptive solvers: bound on attempted (accepted + rejected) steps; a solve that
        reaches it stops short of t1 and reports `max_steps_reached` (it does not raise).
      adjoint: "backprop" or "adjoint" (see ADJOINTS).
      checkpoints: "backprop" only: states stored for the backward pass; None stores
        log2(max_steps) and recomputes the rest (diffrax's default).
      t0, t1: the time interval.
    """

    solver: str = "dopri5"
    steps: int = 4
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 32
    adjoint: str = "backprop"
    checkpoints: int | None = None
    t0: float = 0.0
    t1: float = 1.0

    def __post_init__(self):
        known = {**FIXED_STEP_SOLVERS, **ADAPTIVE_SOLVERS}
        if self.solver not in known:
            raise ValueError(
                f"Unknown ODE solver {self.solver!r}. Fixed-step: "
                f"{', '.join(FIXED_STEP_SOLVERS)}; adaptive: {', '.join(ADAPTIVE_SOLVERS)}. "
                "Set config.model.solver to one of them."
            )
        if self.adjoint not in ADJOINTS:
            raise ValueError(
                f"Unknown adjoint {self.adjoint!r}. Known: {', '.join(ADJOINTS)}. "
                "Set config.model.adjoint to one of them."
            )
        if self.steps < 1 or self.max_steps < 1:
            raise ValueError(
                f"config.model.steps ({self.steps}) and config.model.max_steps "
                f"({self.max_steps}) must be at least 1."
            )
        if not self.t1 > self.t0:
            raise ValueError(f"Integrate forward in time: need t1 ({self.t1}) > t0 ({self.t0}).")

    @property
    def adaptive(self) -> bool:
        return self.solver in ADAPTIVE_SOLVERS


def _evaluations(solver: diffrax.AbstractSolver) -> tuple[int, int]:
    """(vector-field evaluations per attempted step, evaluations once per solve).

    An FSAL ("first same as last") tableau reuses its last stage as the next step's first,
    also after a rejected step (same t and y), so it costs one evaluation fewer per step and
    one extra on the first step.
    """
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tableau = solver.tableau
    if tableau.fsal:
        return tableau.num_stages - 1, 1
    return tableau.num_stages, 0


def solve(
    vector_field: VectorField, y0: PyTree, args: PyTree, config: SolverConfig
) -> tuple[PyTree, dict[str, jax.Array]]:
    """y(t1) for y(t0) = y0 and dy/dt = vector_field(t, y, args), with solver statistics.

    `vector_field` must be pure: everything it differentiates with respect to (network
    parameters) comes in through `args`, never a closure, so both adjoints see it and no
    tracer leaks out of diffrax's loops (flax 2887, diffrax 115).

    Args:
      vector_field: (t (), y PyTree, args) -> dy/dt, a PyTree shaped like y.
      y0: the initial state, e.g. (B, H, W, C).
      args: PyTree passed to every call of `vector_field`, e.g. {"params": ...}.
      config: solver, step control and adjoint.

    Returns:
      (y(t1) shaped like y0, stats), stats of float32 scalars: `nfe` (evaluations of the
      vector field in the forward solve), `steps` (attempted), `accepted_steps`,
      `rejected_steps` and `max_steps_reached` (1.0 if the solve stopped before t1; y is
      then the last state reached). `nfe` is exact except that an FSAL solver whose very
      first step is rejected re-evaluates f(t0, y0), one uncounted evaluation per such
      rejection (diffrax keeps its "first step" flag until a step is accepted).
    """
    # An explicit first step for adaptive solvers too. diffrax's automatic one (dt0=None) is
    # the Hairer-Wanner heuristic, 2 evaluations its stats do not show; in diffrax 0.7.2 it
    # sees the direction-wrapped term, skips, and always tries 0.01, whatever t1 - t0 is.
    dt0 = (config.t1 - config.t0) / config.steps
    if config.adaptive:
        solver = ADAPTIVE_SOLVERS[config.solver]()
        controller = diffrax.PIDController(rtol=config.rtol, atol=config.atol)
        max_steps = config.max_steps
    else:
        solver = FIXED_STEP_SOLVERS[config.solver]()
        controller = diffrax.ConstantStepSize()
        max_steps = config.steps  # exactly enough: the solve never stops short of t1
    if config.adjoint == "adjoint":
        # The backward solve gets the same max_steps; reaching it there would leave the
        # gradients silently wrong (throw=False applies to it too), so it raises instead.
        backward = {"throw": True}
        if config.adaptive:
            # Step control on the state and its adjoint only, not on the parameters' adjoint
            # (an integral, whose error does not feed back): Kidger et al. (2021), "Hey,
            # that's not an ODE", about 40% fewer backward steps.
            backward["stepsize_controller"] = diffrax.PIDController(
                rtol=config.rtol, atol=config.atol, norm=diffrax.adjoint_rms_seminorm
            )
        adjoint = diffrax.BacksolveAdjoint(**backward)
    else:
        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=config.checkpoints)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0=config.t0,
        t1=config.t1,
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=max_steps,
        throw=False,  # Reaching max_steps becomes a metric, not an error mid-training.
    )
    y1 = jax.tree.map(lambda y: y[-1], sol.ys)  # ys: (1, *y0.shape), the state at t1
    per_step, once = _evaluations(solver)
    num_steps = sol.stats["num_steps"]
    stats = {
        "nfe": once + per_step * num_steps,
        "steps": num_steps,
        "accepted_steps": sol.stats["num_accepted_steps"],
        "rejected_steps": sol.stats["num_rejected_steps"],
        "max_steps_reached": sol.result == diffrax.RESULTS.max_steps_reached,
    }
    stats = {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in stats.items()}
    return y1, stats


def _groups(features: int, max_groups: int = 32) -> int:
    """Chen et al.'s GroupNorm(min(32, C)), made to divide C for any width."""
    return math.gcd(max_groups, features)


class Conv3x3(nn.Module):
    """A 3x3 convolution, stride 1, zero padding 1, with bias: nn.Conv's parameters and init.

    `im2col=True` computes it as one matmul of the 9 shifted copies of the input with the
    kernel. Inside a while loop (diffrax's solve and backward pass) XLA:CPU computes the
    kernel gradient of a native convolution ~30x slower than the same convolution unrolled;
    as a matmul it is fast: ODE-Net's train step (batch 128, 28x28, 2 CPU cores) takes 1.8 s
    instead of 9.7 s. `im2col=False` uses `lax.conv_general_dilated` (faster outside loops,
    and the better choice on GPU and TPU). Both read the same parameters.
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
        norm = functools.partial(nn.GroupNorm, num_groups=_groups(self.features), dtype=self.dtype)

        def conv(y: jax.Array, name: str) -> jax.Array:
            if self.time_channel:
                tt = jnp.full((*y.shape[:-1], 1), t, y.dtype)  # (B, H, W, 1)
                y = jnp.concatenate([tt, y], axis=-1)  # (B, H, W, C + 1)
            return Conv3x3(self.features, self.im2col, self.dtype, name=name)(y)

        y = conv(act(norm(name="norm1")(h)), "conv1")
        y = conv(act(norm(name="norm2")(y)), "conv2")
        return norm(name="norm3")(y)


class ODEBlock(nn.Module):
    """h(t1) where h(t0) = x and dh/dt = f(h, t; theta), f an ODEFunc of x's width.

    f's parameters are one variable of this block, created with f's own `init`, and go into
    the solve as diffrax's `args`: the vector field is the pure `f.apply(args, h, t)`, so the
    block works under jit, grad, both adjoints and the sharded train step. Sows the solver
    statistics of `solve` into the "intermediates" collection as `ode_<name>` scalars.
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
        state_dtype = jnp.promote_types(x.dtype, jnp.float32)
        h0, t0 = x.astype(state_dtype), jnp.zeros((), state_dtype)
        params = self.param("func", lambda rng: func.init(rng, h0[:1], t0)["params"])

        def vector_field(t, h, params):
            return func.apply({"params": params}, h, t).astype(h.dtype)

        h, stats = solve(vector_field, h0, params, self.solver_config)
        for name, value in stats.items():
            self.sow("intermediates", f"ode_{name}", value)
        return h.astype(x.dtype)


def _solver_config(model: nn.Module) -> SolverConfig:
    return SolverConfig(
        solver=model.solver,
        steps=model.steps,
        rtol=model.rtol,
        atol=model.atol,
        max_steps=model.max_steps,
        adjoint=model.adjoint,
        checkpoints=model.checkpoints,
        t0=0.0,
        t1=model.t1,
    )


class ODENet(nn.Module):
    """ODE-Net (Chen et al., 2018, "Neural ordinary differential equations"), for MNIST-like input.

    conv3x3 (no padding), norm, act, conv4x4/2, norm, act, conv4x4/2 -> (B, 6, 6, width) for
    28x28 input; one ODEBlock over [0, t1]; norm, act, global average pooling, dense. Norms
    are GroupNorm(min(32, width)). With width 64 it has 0.21M parameters (the paper: 0.22M).

    `residual_blocks=n > 0` replaces the ODE block by n residual blocks h + f(h) of the same
    f without time (the paper's ResNet baseline has 6): a ResNet of matching width whose
    "NFE" is n. Solver fields are those of SolverConfig; `im2col`: see Conv3x3.
    """

    num_classes: int
    width: int = 64
    solver: str = "dopri5"
    steps: int = 4
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 32
    adjoint: str = "backprop"
    checkpoints: int | None = None
    t1: float = 1.0
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
        norm = functools.partial(nn.GroupNorm, num_groups=_groups(self.width), dtype=self.dtype)
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
                _solver_config(self), self.activation, self.im2col, self.dtype, name="ode"
            )
            x = ode(x, train=train)
        x = act(norm(name="final_norm")(x))
        x = jnp.mean(x, axis=(1, 2))  # (B, width)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class ODEResNet(nn.Module):
    """A CIFAR ResNet (He et al., 2016) whose stages in `ode_stages` (1-based) are ODE blocks.

    Layout and names are cnn_lab's `ResNet(family="cifar")` (post-activation, option A
    shortcuts): stem conv3x3 16*width, three stages of (depth - 2) / 6 basic blocks of
    16/32/64 * width channels, global average pooling, dense. An ODE stage keeps its
    downsampling first block (stages 2 and 3), which changes the shape, and replaces its
    shape-preserving blocks by one ODEBlock of the stage's width (for stage 1: the whole
    stage). `ode_stages=()` is exactly `ResNet(family="cifar")`. Solver fields are those of
    SolverConfig; `im2col`: see Conv3x3.
    """

    num_classes: int
    depth: int = 20
    width: float = 1.0
    ode_stages: tuple[int, ...] = (2,)
    solver: str = "dopri5"
    steps: int = 4
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 32
    adjoint: str = "backprop"
    checkpoints: int | None = None
    t1: float = 1.0
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
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, ...), got {self.depth}; "
                "change config.model.depth."
            )
        if not set(self.ode_stages) <= {1, 2, 3}:
            raise ValueError(
                f"config.model.ode_stages={self.ode_stages} must name stages among 1, 2, 3."
            )
        num_blocks, stem_width = (self.depth - 2) // 6, round(16 * self.width)
        act = get_activation(self.activation)
        conv, norm = conv_and_norm(self, train)
        block = functools.partial(
            ResidualBlock,
            bottleneck=False,
            shortcut="A",
            preactivation=False,
            zero_init_last=False,
            conv=conv,
            norm=norm,
            act=act,
            drop_path=functools.partial(StochasticDepth, 0.0),
        )
        x = conv(stem_width, (3, 3), 1, padding=1, name="stem_conv")(x)  # (B, H, W, 16)
        x = act(norm(name="stem_norm")(x))
        for stage in range(3):
            filters = stem_width * 2**stage
            ode = stage + 1 in self.ode_stages
            for i in range(num_blocks):
                strides = 2 if stage > 0 and i == 0 else 1
                if ode and strides == 1:
                    break
                name = f"stage{stage + 1}_block{i + 1}"
                x = block(filters=filters, strides=strides, name=name)(x, train=train)
            if ode:
                name = f"stage{stage + 1}_ode"
                ode_block = ODEBlock(
                    _solver_config(self), self.activation, self.im2col, self.dtype, name=name
                )
                x = ode_block(x, train=train)  # (B, H', W', filters)
        x = jnp.mean(x, axis=(1, 2))  # (B, C)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
