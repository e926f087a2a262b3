"""Projected Newton for λ* = argmin_{λ≥0} D̂(λ) (DESIGN §2), as one `lax.while_loop`: jit- and vmap-able.

Bertsekas' two-metric projection: coordinates at the bound with a positive gradient (ε-active) take a scaled
gradient step, the free ones a Newton step on the free block of the Hessian, and the step is projected onto
λ ≥ 0. Steps are damped Levenberg-Marquardt style (H + μI) and μ is raised until the Armijo condition holds:
a small β makes D̂ nearly piecewise linear with a vanishing Hessian away from its kinks, where plain
backtracking along an astronomically long Newton step fails. μ shrinks 8x after each accepted step, so the
iteration becomes pure Newton (quadratic) near λ*. Each trial is evaluated with the fused
value+gradient+Hessian pass, so an accepted step costs exactly one pass over the data.

Before iterating, each margin is checked against its reach (the largest improvement a policy supported on the
samples can make in that constraint alone); margins at or beyond it are infeasible at once. Jointly
infeasible margins show as λ growing without bound; the recession slope along λ/|λ| then certifies it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from can_jax.certify import kkt_residual, predicted_outcome, recession_slope, reduced_eigs
from can_jax.dual import DualEval, _pass_blocks, to_blocks
from can_jax.result import DualResult, Status
from can_jax.scores import Scores

ARMIJO = 1e-4
MAX_TRIES = 80  # damping increases per iteration (4^80: any step is short enough by then)
WARM_STRIDE = 16
WARM_MIN_BLOCKS = 64
LAM_MAX = 1e12  # beyond this λ is unbounded for any scores of sane magnitude (checked by the recession slope)


class _State(NamedTuple):
    lam: jnp.ndarray
    ev: DualEval
    mu: jnp.ndarray  # Levenberg-Marquardt damping carried between iterations
    nit: jnp.ndarray
    nfev: jnp.ndarray
    status: jnp.ndarray


def default_tol(dtype) -> float:
    """KKT tolerance: 1e-9 in float64 (DESIGN §2), 1e-5 in float32 (its precision floor on scores of order 10)."""
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def _direction(lam, ev: DualEval, eps, mu):
    """Two-metric projected Newton direction, damped by μ (Levenberg-Marquardt). Returns d [m]."""
    g, h = ev.grad, ev.hess
    fixed = (lam <= eps) & (g > 0)
    free = ~fixed
    both = free[:, None] & free[None, :]
    diag = jnp.diag(h)
    scale = jnp.maximum(jnp.max(jnp.abs(diag)), jnp.finfo(h.dtype).tiny)
    # A tiny relative ridge keeps the solve defined when a utility barely varies (singular free block).
    ridge = 1e-12 * scale + mu
    h_free = jnp.where(both, h, 0.0) + jnp.diag(jnp.where(free, ridge, 1.0))
    d_free = -jnp.linalg.solve(h_free, jnp.where(free, g, 0.0))
    d_fixed = -g / (jnp.where(diag > 0, diag, 0.0) + ridge)
    return jnp.where(free, d_free, d_fixed)


def _newton(blocks: Scores, margins, beta, lam0, tol, max_iter: int) -> _State:
    def evaluate(lam, reach=False):
        return _pass_blocks(lam, blocks, margins, beta, 2, reach=reach)

    def cond(st: _State):
        return st.status == Status.RUNNING

    def body(st: _State):
        lam, ev = st.lam, st.ev
        res = kkt_residual(lam, ev.grad)
        eps = jnp.minimum(res, 1e-3)
        # Near λ* a Newton step lowers D̂ by ~|∇D̂|²/H, far below the rounding of D̂ itself; without this
        # allowance Armijo then rejects good steps at random (seen under vmap, whose sums round differently).
        noise = 64 * jnp.finfo(lam.dtype).eps * (1.0 + jnp.abs(ev.value))

        def trial(mu):
            new = jnp.maximum(lam + _direction(lam, ev, eps, mu), 0.0)
            return new, evaluate(new)

        def rejected(c):
            mu, new, ev_new, k = c
            decrease = ev.value + ARMIJO * ev.grad @ (new - lam) + noise
            bad = ~(ev_new.value <= decrease) | ~jnp.isfinite(ev_new.value)
            return bad & (k < MAX_TRIES)

        def damp(c):
            # Where D̂ is nearly flat (small β: weights almost one-hot, Hessian ~ 0) the Newton step is absurdly
            # long; the first increase makes it a unit-length gradient step, later ones shorten it 4x each.
            mu, _, _, k = c
            mu = jnp.maximum(4.0 * mu, jnp.max(jnp.abs(ev.grad)))
            new, ev_new = trial(mu)
            return mu, new, ev_new, k + 1

        new, ev_new = trial(st.mu)
        mu, new, ev_new, k = jax.lax.while_loop(rejected, damp, (st.mu, new, ev_new, 0))
        accepted = k < MAX_TRIES
        lam_next = jnp.where(accepted, new, lam)
        ev_next = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), ev_new, ev)._replace(reach=ev.reach)
        res_next = kkt_residual(lam_next, ev_next.grad)
        nit = st.nit + 1
        finite = jnp.isfinite(ev_next.value) & jnp.all(jnp.isfinite(ev_next.grad))
        status = jnp.select(
            [
                ~finite,
                res_next <= tol,
                jnp.max(lam_next) > LAM_MAX,
                ~accepted,
                nit >= max_iter,
            ],
            [Status.NONFINITE, Status.CONVERGED, Status.DIVERGED, Status.PRECISION, Status.MAX_ITER],
            Status.RUNNING,
        )
        return _State(lam_next, ev_next, mu / 8.0, nit, st.nfev + k + 1, status)

    ev0 = evaluate(lam0, reach=True)  # the first pass also measures each constraint's reach
    res0 = kkt_residual(lam0, ev0.grad)
    out_of_reach = jnp.any(margins >= ev0.reach - 1e-12 * (1.0 + jnp.abs(ev0.reach)))
    status0 = jnp.select(
        [~jnp.isfinite(ev0.value), out_of_reach, res0 <= tol],
        [Status.NONFINITE, Status.INFEASIBLE, Status.CONVERGED],
        Status.RUNNING,
    )
    zero = jnp.zeros((), jnp.int32)
    st = _State(lam0, ev0, jnp.zeros((), lam0.dtype), zero, zero + 1, status0)
    return jax.lax.while_loop(cond, body, st)


def solve_dual(
    scores: Scores,
    margins: jnp.ndarray,
    beta,
    lam0: jnp.ndarray | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    block: int | None | str = "auto",
    warm_start: bool = True,
) -> DualResult:
    """Solves min_{λ≥0} D̂(λ) by projected Newton and certifies the answer.

    Args:
      scores: N prompts × K responses × m utilities (`Scores`).
      margins: [m] required improvements b over the reference policy.
      beta: KL weight β > 0 (traced: sweeps may vmap over it).
      lam0: [m] starting point (default zeros).
      tol: KKT residual tolerance (default 1e-9 in float64, 1e-5 in float32).
      max_iter: Newton iteration limit (static).
      block: prompts per scan block (static), see `dual_pass`.
      warm_start: on large data (≥ 64 blocks), start from the solution on 1/16 of the prompts (static).
    Returns:
      `DualResult`. Infeasible margins give status INFEASIBLE (never a silently huge λ).
    """
    dtype = scores.reward.dtype
    m = scores.utility.shape[-1]
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    beta = jnp.asarray(beta, dtype)
    tol = default_tol(dtype) if tol is None else tol
    lam0 = jnp.zeros((m,), dtype) if lam0 is None else jnp.maximum(jnp.asarray(lam0, dtype), 0.0)
    blocks = to_blocks(scores, block)

    n_blocks = blocks.reward.shape[0]
    if warm_start and n_blocks >= WARM_MIN_BLOCKS:
        # Solve first on every WARM_STRIDE-th block of prompts (1/16 of the data, at 1/16 of the cost per pass):
        # its λ* is within sampling error of the full one, from where full-data Newton needs ~3 passes, not ~6.
        sub = jax.tree.map(lambda x: x[::WARM_STRIDE], blocks)
        st_sub = _newton(sub, margins, beta, lam0, jnp.maximum(tol, 1e-6), max_iter)
        lam0 = jnp.where(st_sub.status == Status.CONVERGED, st_sub.lam, lam0)
    # Margins at or beyond their reach (up to rounding) are only approached as λ → ∞: `_newton` stops at once.
    st = _newton(blocks, margins, beta, lam0, tol, max_iter)
    diverged = st.status == Status.DIVERGED
    slope = jax.lax.cond(diverged, lambda: recession_slope(blocks, st.lam, margins), lambda: jnp.zeros((), dtype))
    status = jnp.where(diverged & (slope < 0), Status.INFEASIBLE, st.status)

    lam = st.lam
    active = lam > 0
    min_eig, cond = reduced_eigs(st.ev.hess, active)
    return DualResult(
        x=lam,
        fun=st.ev.value,
        jac=st.ev.grad,
        hess=st.ev.hess,
        nit=st.nit,
        nfev=st.nfev,
        status=status,
        kkt_residual=kkt_residual(lam, st.ev.grad),
        active=active,
        min_eig=min_eig,
        cond=cond,
        reach=st.ev.reach,
        slope=slope,
        predicted=predicted_outcome(lam, blocks, beta),
    )


solve_dual_jit = jax.jit(solve_dual, static_argnames=("max_iter", "block", "warm_start"))
