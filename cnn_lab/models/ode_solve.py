"""Solving dy/dt = f(t, y, args) with diffrax: vector field, solver, step-size controller and
adjoint chosen apart, and the solve's statistics (function evaluations, steps)."""

from collections.abc import Callable
from typing import Any, ClassVar

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from cnn_lab.models.ode_config import SolverConfig

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


# Every solver's class, by its name in ode_config.
SOLVERS: dict[str, type[diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "ralston": diffrax.Ralston,
    "rk4": RK4,
    "bosh3": diffrax.Bosh3,
    "dopri5": diffrax.Dopri5,
    "tsit5": diffrax.Tsit5,
}


def make_solver(config: SolverConfig) -> diffrax.AbstractSolver:
    """The Runge-Kutta method named by `config.solver`."""
    return SOLVERS[config.solver]()


def make_controller(config: SolverConfig) -> diffrax.AbstractStepSizeController:
    """A PID controller on (rtol, atol) for adaptive solvers, constant steps for the others."""
    if config.adaptive:
        return diffrax.PIDController(rtol=config.rtol, atol=config.atol)
    return diffrax.ConstantStepSize()


def make_adjoint(config: SolverConfig) -> diffrax.AbstractAdjoint:
    """How gradients flow through the solve: backpropagation or the backward adjoint solve."""
    if config.adjoint == "backprop":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=config.checkpoints)
    # The backward solve gets the same max_steps; reaching it there would leave the gradients
    # silently wrong (throw=False applies to it too), so it raises instead.
    backward = {"throw": True}
    if config.adaptive:
        # Step control on the state and its adjoint only, not on the parameters' adjoint (an
        # integral, whose error does not feed back): Kidger et al. (2021), "Hey, that's not an
        # ODE", about 40% fewer backward steps.
        backward["stepsize_controller"] = diffrax.PIDController(
            rtol=config.rtol, atol=config.atol, norm=diffrax.adjoint_rms_seminorm
        )
    return diffrax.BacksolveAdjoint(**backward)


def evaluations(solver: diffrax.AbstractSolver) -> tuple[int, int]:
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
    solver = make_solver(config)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0=config.t0,
        t1=config.t1,
        # An explicit first step for adaptive solvers too. diffrax's automatic one (dt0=None)
        # is the Hairer-Wanner heuristic, 2 evaluations its stats do not show; in diffrax 0.7.2
        # it sees the direction-wrapped term, skips, and always tries 0.01, whatever t1 - t0 is.
        dt0=(config.t1 - config.t0) / config.steps,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=make_controller(config),
        adjoint=make_adjoint(config),
        # Fixed steps: exactly enough, so the solve never stops short of t1.
        max_steps=config.max_steps if config.adaptive else config.steps,
        throw=False,  # Reaching max_steps becomes a metric, not an error mid-training.
    )
    y1 = jax.tree.map(lambda y: y[-1], sol.ys)  # ys: (1, *y0.shape), the state at t1
    per_step, once = evaluations(solver)
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
