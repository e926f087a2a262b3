"""The correction round of DESIGN §7: step λ from measured gains, with the dual's own sensitivity.

The aligned policy achieves gains a(λ) that differ from the predicted p(λ) = ∇D̂(λ) + b. The dual knows how the
predicted gains move with λ, ∂p/∂λ = ∇²D̂(λ) = H, so a round replaces the predicted gradient by the measured one and
takes the constrained Newton step of the model a(λ') ≈ a(λ) + J(λ' − λ):

    λ' = argmin_{λ' ≥ 0}  (a − b)ᵀ(λ' − λ) + ½ (λ' − λ)ᵀ J (λ' − λ)

whose KKT conditions are those of the constraints under the model: λ'_j > 0 with a_j(λ') = b_j (active), or
λ'_j = 0 with a_j(λ') ≥ b_j (slack). Where no constraint changes status this is λ' = λ + J⁻¹(b − a) on the active
set. J = H at first; after two rounds a secant update (self-scaling BFGS, Powell-damped so J stays positive
definite) makes J(λ_t − λ_{t−1}) = a_t − a_{t−1}. CAID (arXiv 2505.19387) instead steps λ' = [λ − η(a − b)]₊
with a hand-set η.

`stop_rule` is when a run on real models stops (`train.refine`): measured gains within a tolerance of the margins,
judged with simultaneous (Bonferroni) intervals over the m constraints.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ARMIJO = 1e-4
HALVINGS = 40


def _quadratic(lam, lam0, grad0, jac):
    d = lam - lam0
    return grad0 @ d + 0.5 * d @ jac @ d


@partial(jax.jit, static_argnames=("iters",))
def box_qp(jac: jnp.ndarray, grad0: jnp.ndarray, lam0: jnp.ndarray, iters: int | None = None) -> jnp.ndarray:
    """argmin_{λ ≥ 0} grad0ᵀ(λ − λ0) + ½(λ − λ0)ᵀ jac (λ − λ0): [m], for jac [m, m] symmetric positive definite.

    Bertsekas' two-metric projected Newton (as `solve.py`, on an exact quadratic): coordinates at the bound whose
    gradient pushes them out stay fixed, the others take the Newton step of their block, and a projected Armijo
    search keeps each step a descent. Once the active set is found the step is exact. `iters` (static) defaults
    to 4m + 10.
    """
    m = grad0.shape[0]
    iters = 4 * m + 10 if iters is None else iters
    diag = jnp.diag(jac)
    ridge = 1e-12 * jnp.maximum(jnp.max(jnp.abs(diag)), jnp.finfo(jac.dtype).tiny)
    alphas = 0.5 ** jnp.arange(HALVINGS, dtype=jac.dtype)  # [S]

    def body(_, lam):
        g = grad0 + jac @ (lam - lam0)
        eps = jnp.minimum(jnp.max(jnp.abs(jnp.minimum(lam, g))), 1e-3)
        fixed = (lam <= eps) & (g > 0)
        free = ~fixed
        both = free[:, None] & free[None, :]
        j_free = jnp.where(both, jac, 0.0) + jnp.diag(jnp.where(free, ridge, 1.0))
        d = jnp.where(free, -jnp.linalg.solve(j_free, jnp.where(free, g, 0.0)), -g / (diag + ridge))
        trial = jnp.maximum(lam + alphas[:, None] * d, 0.0)  # [S, m]
        q0 = _quadratic(lam, lam0, grad0, jac)
        q = jax.vmap(lambda t: _quadratic(t, lam0, grad0, jac))(trial)
        ok = q <= q0 + ARMIJO * (trial - lam) @ g
        first = jnp.argmax(ok)
        return jnp.where(jnp.any(ok), trial[first], lam)

    return jax.lax.fori_loop(0, iters, body, jnp.maximum(lam0, 0.0))


def newton_step(lam: jnp.ndarray, achieved: jnp.ndarray, margins: jnp.ndarray, jac: jnp.ndarray) -> jnp.ndarray:
    """One correction: λ' ≥ 0 at which the linear model a + J(λ' − λ) meets the margins (active) or exceeds them
    (slack, λ'_j = 0). lam, achieved, margins [m]; jac [m, m] the sensitivity ∂a/∂λ (H from the dual at first)."""
    return box_qp(jac, achieved - margins, lam)


def caid_step(lam: jnp.ndarray, achieved: jnp.ndarray, margins: jnp.ndarray, eta) -> jnp.ndarray:
    """CAID's projected dual step λ' = [λ − η(a − b)]₊ (arXiv 2505.19387): [m]."""
    return jnp.maximum(lam - eta * (achieved - margins), 0.0)


def secant_update(jac: jnp.ndarray, dlam: jnp.ndarray, dgain: jnp.ndarray, self_scale: bool = True) -> jnp.ndarray:
    """BFGS update of the sensitivity J so that J·dlam = dgain (the secant condition): [m, m].

    self_scale (Oren–Luenberger): first rescale J by τ = dgainᵀdlam / dlamᵀJ dlam, the measured-over-modelled
    curvature along the step. A policy class that realises a fixed fraction of every predicted move (a ≈ c·p)
    has sensitivity c·H in every direction; one secant pair alone corrects only the direction moved, the
    rescaling carries c to the others. τ is clipped to [0.05, 20]. Powell's damping then blends dgain with
    J·dlam where dgainᵀdlam < 0.2 dlamᵀJ dlam (a flatter or noisier response than J predicts), so J stays
    symmetric positive definite. No move (dlam = 0) or no positive curvature leaves J unchanged.
    """
    tiny = jnp.finfo(jac.dtype).tiny
    sjs0 = dlam @ jac @ dlam
    moved = sjs0 > 1e-14 * (1.0 + jnp.sum(jac**2)) * (dlam @ dlam) + tiny
    curv = dlam @ dgain
    if self_scale:
        tau = jnp.clip(curv / jnp.where(moved, sjs0, 1.0), 0.05, 20.0)
        jac = jnp.where(moved & (curv > 0), tau * jac, jac)
    js = jac @ dlam
    sjs = dlam @ js
    theta = jnp.where(curv >= 0.2 * sjs, 1.0, 0.8 * sjs / jnp.where(sjs - curv > 0, sjs - curv, 1.0))
    y = theta * dgain + (1.0 - theta) * js
    sy = dlam @ y
    ok = moved & (sy > 0)
    new = jac - jnp.outer(js, js) / jnp.where(ok, sjs, 1.0) + jnp.outer(y, y) / jnp.where(ok, sy, 1.0)
    return jnp.where(ok, 0.5 * (new + new.T), jac)


class Refine(NamedTuple):
    """State of the correction rounds: the λ to align with next, the sensitivity J and the previous round."""

    lam: jnp.ndarray  # [m]
    jac: jnp.ndarray  # [m, m]
    lam_prev: jnp.ndarray  # [m] λ of the previous measured round (unused before the first)
    gain_prev: jnp.ndarray  # [m] its achieved gains
    rounds: jnp.ndarray  # measured rounds so far


def refine_init(lam: jnp.ndarray, hess: jnp.ndarray) -> Refine:
    """Start from the one-shot λ* and the dual's Hessian there (`DualResult.x`, `DualResult.hess`)."""
    return Refine(lam, hess, jnp.zeros_like(lam), jnp.zeros_like(lam), jnp.zeros((), jnp.int32))


def refine_step(
    state: Refine, achieved: jnp.ndarray, margins: jnp.ndarray, secant: bool = True, self_scale: bool = True
) -> Refine:
    """Given the gains achieved by the policy aligned at `state.lam`, the next λ (and J after a secant update
    from the previous round when there is one and `secant` is set). jit-able; the flags are static."""
    jac = state.jac
    if secant:
        updated = secant_update(jac, state.lam - state.lam_prev, achieved - state.gain_prev, self_scale)
        jac = jnp.where(state.rounds > 0, updated, jac)
    lam = newton_step(state.lam, achieved, margins, jac)
    return Refine(lam, jac, state.lam, achieved, state.rounds + 1)


def next_lambda(lams, gains, margins, hess0, step: str = "newton", eta: float = 1.0,
                secant: bool = True) -> np.ndarray:  # fmt: skip
    """λ for the next round from the measured history: `lams`[t] and `gains`[t] the λ and achieved gains of round t
    (round 0 first), `hess0` the dual's Hessian at round 0's λ. Newton steps are replayed from round 0, so a resumed
    run takes exactly the step it would have taken; CAID's step needs the last round alone."""
    if step == "caid":
        return np.asarray(caid_step(jnp.asarray(lams[-1]), jnp.asarray(gains[-1]), jnp.asarray(margins), eta), float)
    state = refine_init(jnp.asarray(lams[0]), jnp.asarray(hess0))
    for a in gains:
        state = refine_step(state, jnp.asarray(a), jnp.asarray(margins), secant=secant)
    return np.asarray(state.lam, float)


def on_target(gain: jnp.ndarray, margins: jnp.ndarray, active: jnp.ndarray, interval=0.0, floor: float = 0.02):
    """The benchmark's stopping rule: every active constraint within max(floor, interval) of its
    margin, every slack one at least at its margin less that tolerance. gain, margins, active [m]; -> bool."""
    tol = jnp.maximum(floor, interval)
    close = jnp.abs(gain - margins) <= tol
    met = gain >= margins - tol
    return jnp.all(jnp.where(active, close, met))


def simultaneous_level(m: int, level: float = 0.95) -> float:
    """The per-constraint confidence level whose m two-sided intervals hold jointly with probability ≥ `level`
    (Bonferroni): 1 − (1 − level)/m."""
    return 1.0 - (1.0 - level) / max(int(m), 1)


def stop_rule(gain, half_width, margins, active, floor: float = 0.02):
    """The stopping rule of `can refine`, on measured gains. Stop when every active constraint's measured
    gain is within tol_j = max(floor, h_j) of b_j and every slack one is at least b_j − tol_j, where h_j is the
    half-width of its *simultaneous* interval (`simultaneous_level`). Returns (stop, tol) as numpy values.

    What a stop promises: with probability ≥ the intervals' joint level, every true gain lies within h_j of its
    measurement, so every active true gain is within tol_j + h_j of b_j (and no slack one below b_j − tol_j − h_j).
    A stop where that fails is a false stop (benchmarks/stop_rule_bench.py measures how often).
    """
    import numpy as np

    gain, h, b = (np.asarray(x, float) for x in (gain, half_width, margins))
    active = np.asarray(active, bool)
    tol = np.maximum(floor, h)
    ok = np.where(active, np.abs(gain - b) <= tol, gain >= b - tol)
    return bool(np.all(ok)), tol
