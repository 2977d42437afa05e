"""How an ODE block integrates: the solver's name, steps, tolerances and adjoint, validated.

Free of diffrax, whose import costs most of a second: every process builds models, and only
those that run an ODE block import `ode_solve`.
"""

import dataclasses

# Fixed steps of (t1 - t0) / steps; adaptive steps from an embedded error estimate (PID).
FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun", "ralston", "rk4")
ADAPTIVE_SOLVERS = ("bosh3", "dopri5", "tsit5")
# "backprop": differentiate through the solver's operations (diffrax's
# RecursiveCheckpointAdjoint); "adjoint": solve the adjoint ODE backwards in time (Chen et al.'s
# method, diffrax's BacksolveAdjoint): O(1) memory in the number of steps, gradients exact
# only up to the tolerance of the backward solve.
ADJOINTS = ("backprop", "adjoint")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """How to integrate dh/dt = f(t, h) from t0 to t1. Every field is static (it shapes the trace).

    Attributes:
      solver: one of FIXED_STEP_SOLVERS or ADAPTIVE_SOLVERS.
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
        if self.solver not in (*FIXED_STEP_SOLVERS, *ADAPTIVE_SOLVERS):
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
        """Whether the solver picks its own steps (an embedded error estimate and a PID)."""
        return self.solver in ADAPTIVE_SOLVERS
