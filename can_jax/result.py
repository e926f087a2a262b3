"""The solver's result: scipy's OptimizeResult names plus the dual certificate.

A NamedTuple of arrays, so `solve_dual` can be jitted and vmapped (`sweep`); `message` and `ok` read the
status outside jit.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # only the annotations name JAX: the certificate reader and the CLI read `Status` without it
    import jax.numpy as jnp


class Status(enum.IntEnum):
    """Why the solver stopped: each code with its human message (optimistix's `RESULTS`), so no code can lack one.

    The codes are ints because `solve_dual` carries them through `lax.while_loop` and vmap; `label` is the lower-case
    name the certificate, `can dual --json` and `can sweep` print, and what users' scripts compare with.
    """

    message: str

    def __new__(cls, code: int, message: str):
        member = int.__new__(cls, code)
        member._value_ = code
        member.message = message
        return member

    CONVERGED = 0, "converged: KKT residual within tolerance"
    MAX_ITER = 1, "stopped at the iteration limit before the KKT residual reached the tolerance"
    INFEASIBLE = 2, "infeasible margins: no policy supported on the samples reaches them (dual unbounded)"
    PRECISION = (
        3,
        "stopped at the floating-point precision limit before the KKT residual reached the tolerance: "
        "no further decrease of the dual is possible; centre or rescale the scores",
    )
    NONFINITE = 4, "a non-finite value (NaN/inf) appeared in the dual; check the scores"
    DIVERGED = 5, "the multipliers grew without bound: the margins are at the edge of what the samples reach"
    INVALID = 6, "invalid arguments: beta and tol must be positive and finite, and the margins finite"
    RUNNING = -1, "running"

    @property
    def label(self) -> str:
        from can_jax.errors import Outcome

        return Outcome[self.name].value


class Predicted(NamedTuple):
    """What π_λ should achieve, estimated from the self-normalised weights on the samples (DESIGN §2)."""

    reward_gain: jnp.ndarray  # scalar: E_{π_λ}[r] − E_ref[r]
    utility_gain: jnp.ndarray  # [m]: E_{π_λ}[g] − E_ref[g]
    kl: jnp.ndarray  # scalar: KL(π_λ ‖ π_ref) ≈ mean_i Σ_k w_ik log(K_i w_ik)
    ess: jnp.ndarray  # scalar: mean over prompts of (1/Σ_k w_ik²) / K_i, in (0, 1]; small = few samples carry π_λ


class DualResult(NamedTuple):
    """λ* and its certificate. Field names follow scipy.optimize.OptimizeResult where one exists.

    x [m] λ*; fun D̂(λ*); jac [m] ∇D̂(λ*) (= predicted improvement − margin); hess [m, m]; nit Newton
    iterations; nfev fused passes; status (a `Status` code); kkt_residual max_j |min(λ_j, ∇_j D̂ / σ_j)| with σ_j
    the within-prompt spread of g_j (scale-free: unchanged when r, g, b and β are scaled together); tol [m]: the
    residual each constraint reached for, max(requested, the data's precision floor); active [m] (λ_j > 0);
    min_eig / cond: least eigenvalue and condition number of the Hessian on the active set (the
    strong-convexity certificate; of the full Hessian when no constraint is active); reach [m]: the largest
    improvement any policy supported on the samples reaches in each constraint alone; slope: the dual's
    recession slope along λ/|λ| (negative certifies infeasibility; 0 when λ = 0); predicted: the outcome of π_λ*.
    """

    x: jnp.ndarray
    fun: jnp.ndarray
    jac: jnp.ndarray
    hess: jnp.ndarray
    nit: jnp.ndarray
    nfev: jnp.ndarray
    status: jnp.ndarray
    kkt_residual: jnp.ndarray
    tol: jnp.ndarray
    active: jnp.ndarray
    min_eig: jnp.ndarray
    cond: jnp.ndarray
    reach: jnp.ndarray
    slope: jnp.ndarray
    predicted: Predicted

    @property
    def success(self):
        return self.status == Status.CONVERGED

    @property
    def message(self) -> str:
        """Human message for a single (non-vmapped) result; call outside jit."""
        return Status(int(np.asarray(self.status))).message
