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
infeasible margins show as λ growing without bound (or an iteration limit reached while it grows); the recession
slope along λ/|λ| then certifies it.

Scale: λ* is invariant when r, g, b and β are scaled together (DESIGN §2), and so is every decision
here. The solve runs on per-prompt centred scores (a per-prompt constant does not move λ*, and centring keeps the
low bits of data with large offsets); the KKT residual measures each ∇_j D̂ in units of g_j's within-prompt spread;
every rounding allowance is relative to the magnitudes that were summed. The tolerance reached for is the larger of
the requested one and the data's precision floor (eps times the stored magnitudes, and times H·|λ| for the rounding
of λ itself), so a solve limited by the bits of its input still ends, CONVERGED, at the best answer they allow.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.certify import recession_slope, reduced_eigs
from can_jax.dual import DualEval, Units, cast, device_count, every, pass_units, sharded, to_blocks
from can_jax.errors import InvalidArgumentError
from can_jax.packed import Packed, fast_jit, pack, packable, packed_pass
from can_jax.packed import every as packed_every
from can_jax.packed import recession_slope as packed_slope
from can_jax.packed import units as packed_units
from can_jax.result import DualResult, Predicted, Status
from can_jax.scores import Scores

ARMIJO = 1e-4
MAX_TRIES = 80  # damping increases per iteration (4^80: any step is short enough by then)
WARM_STRIDE = 16
WARM_MIN_BLOCKS = 64
LAM_MAX = 1e12  # beyond this λ is unbounded for any scores of sane magnitude (checked by the recession slope)
ROUNDING = 64  # rounding allowances are ROUNDING · eps · (the magnitudes summed)


class _State(NamedTuple):
    lam: jnp.ndarray
    ev: DualEval
    mu: jnp.ndarray  # Levenberg-Marquardt damping carried between iterations
    nit: jnp.ndarray
    nfev: jnp.ndarray
    status: jnp.ndarray


class _Scale(NamedTuple):
    """The data's own units (all scale with r, g, b and β together)."""

    unit: jnp.ndarray  # [m] within-prompt RMS spread of g_j under π_ref: the unit the KKT residual uses
    mag: jnp.ndarray  # [m] mean_i max_k |g_ikj| of the data as given: the magnitude its rounding scales with
    r_shift: jnp.ndarray  # scalar: the prompt-weighted mean of the reward shift each pass removes (`shift_block`)


def default_tol(dtype) -> float:
    """KKT tolerance, relative to each utility's within-prompt spread: 1e-9 in float64 (DESIGN §2), 1e-5 in
    float32."""
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


def _scale(units: Units, margins) -> _Scale:
    """The data's units from the sums a centring pass gathered (`dual.pass_units`)."""
    tot = jnp.where(units.tot > 0, units.tot, 1.0)
    spread = jnp.sqrt(units.spread2 / tot)  # [m]
    r_spread = jnp.sqrt(units.r_spread2 / tot)
    # A utility constant within prompts has no spread; its ∇_j is −b_j whatever λ, so any positive unit serves:
    # take the problem's own (the largest spread, else |b_j|, else 1) so the residual stays scale-free.
    fallback = jnp.maximum(jnp.maximum(jnp.max(spread), r_spread), jnp.abs(margins))
    fallback = jnp.where(fallback > 0, fallback, 1.0)
    unit = jnp.where(spread > 0, spread, fallback)
    return _Scale(unit, units.mag / tot, units.r_shift / tot)


def _scaled_kkt(lam, grad, scale: _Scale):
    """[m] |min(λ_j, ∇_j D̂ / unit_j)|: the projected-gradient residual with each gradient in its utility's units."""
    return jnp.abs(jnp.minimum(lam, grad / scale.unit))


def _floor(lam, ev: DualEval, margins, scale: _Scale, tol):
    """[m] the tolerance reached for: max(tol, the precision floor of ∇_j / unit_j).

    ∇_j sums values of magnitude mag_j and b_j, and is evaluated at a λ stored to eps·|λ|, which moves it by
    |H|·eps·|λ| (large where β is small relative to the scores' scale: weights nearly one-hot).
    """
    eps = jnp.finfo(lam.dtype).eps
    noise = scale.mag + jnp.abs(margins) + jnp.abs(ev.hess) @ jnp.abs(lam)
    return jnp.maximum(tol, ROUNDING * eps * noise / scale.unit)


class _Data(NamedTuple):
    """The scores as a solve reads them: [C, B, ...] blocks for `dual.pass_units`, or `packed.Packed` (CPU)."""

    blocks: Scores | None = None
    packed: Packed | None = None

    def first(self, lam, margins, beta, predict: bool) -> tuple[DualEval, Units]:
        """The pass at the start: value, gradient, Hessian (and the predicted outcome), each constraint's reach in
        `.reach`, and the data's units."""
        if self.packed is not None:
            found, reach = packed_units(self.packed)
            return packed_pass(lam, self.packed, margins, beta)._replace(reach=reach), found
        return pass_units(lam, self.blocks, margins, beta, 2, predict=predict, reach=True, centre=True, units=True,
                          dtype=lam.dtype)  # fmt: skip

    def evaluate(self, lam, margins, beta, predict: bool) -> DualEval:
        if self.packed is not None:
            return packed_pass(lam, self.packed, margins, beta)
        return pass_units(lam, self.blocks, margins, beta, 2, predict=predict, centre=True, dtype=lam.dtype)[0]

    def every(self, stride: int) -> _Data:
        if self.packed is not None:
            return _Data(packed=packed_every(self.packed, stride))
        return _Data(blocks=every(self.blocks, stride))

    def n_blocks(self) -> int:
        if self.packed is not None:
            return self.packed.x.shape[0]
        return self.blocks.reward.shape[0] * (self.blocks.reward.shape[1] if sharded(self.blocks) else 1)

    def slope(self, lam, margins):
        if self.packed is not None:
            return packed_slope(self.packed, lam, margins)
        return recession_slope(self.blocks, lam, margins, centre=True)


def _newton(data: _Data, margins, beta, lam0, tol, max_iter: int, predict: bool = True) -> tuple[_State, _Scale]:
    """Projected Newton on the scores as stored, each prompt shifted inside every pass (`dual.shift_block`) or
    while packing (`packed.pack`): no centred copy of the [N, K, m] table. The first pass also measures the data's
    units and each constraint's reach. With `predict` (static) every pass also gathers the predicted outcome at its
    λ (~15% of a pass, where a pass of its own after the loop costs ~85%; a packed pass always does): the final
    state's `ev` then holds it for the λ returned."""
    eps = jnp.finfo(lam0.dtype).eps

    def evaluate(lam):
        return data.evaluate(lam, margins, beta, predict)

    def converged(lam, ev):
        return jnp.all(_scaled_kkt(lam, ev.grad, scale) <= _floor(lam, ev, margins, scale, tol))

    def cond(st: _State):
        return st.status == Status.RUNNING

    def body(st: _State):
        lam, ev = st.lam, st.ev
        res = jnp.max(_scaled_kkt(lam, ev.grad, scale))
        eps_active = jnp.minimum(res, 1e-3)
        # Near λ* a Newton step lowers D̂ by ~|∇D̂|²/H, far below the rounding of D̂ itself; without this
        # allowance Armijo then rejects good steps at random (seen under vmap, whose sums round differently).
        # Relative to the magnitudes summed into D̂, so it scales with the data.
        noise = ROUNDING * eps * (jnp.abs(ev.value) + ev.abs_value)

        def trial(mu):
            new = jnp.maximum(lam + _direction(lam, ev, eps_active, mu), 0.0)
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
        nit = st.nit + 1
        finite = jnp.isfinite(ev_next.value) & jnp.all(jnp.isfinite(ev_next.grad))
        status = jnp.select(
            [
                ~finite,
                converged(lam_next, ev_next),
                jnp.max(lam_next) > LAM_MAX,
                ~accepted,
                nit >= max_iter,
            ],
            [Status.NONFINITE, Status.CONVERGED, Status.DIVERGED, Status.PRECISION, Status.MAX_ITER],
            Status.RUNNING,
        )
        return _State(lam_next, ev_next, mu / 8.0, nit, st.nfev + k + 1, status)

    ev0, units = data.first(lam0, margins, beta, predict)
    scale = _scale(units, margins)
    valid = jnp.isfinite(beta) & (beta > 0) & jnp.all(jnp.isfinite(margins)) & jnp.isfinite(tol) & (tol > 0)
    status0 = jnp.select(
        [~valid, ~jnp.isfinite(ev0.value), jnp.any(out_of_reach(margins, ev0.reach, scale)), converged(lam0, ev0)],
        [Status.INVALID, Status.NONFINITE, Status.INFEASIBLE, Status.CONVERGED],
        Status.RUNNING,
    )
    zero = jnp.zeros((), jnp.int32)
    st = _State(lam0, ev0, jnp.zeros((), lam0.dtype), zero, zero + 1, status0)
    return jax.lax.while_loop(cond, body, st), scale


def out_of_reach(margins, reach, scale: _Scale):
    """[m] margins no finite λ reaches: beyond the reach (up to rounding), or at the edge of a constraint that can
    move at all. A margin of 0 on a utility that never varies within a prompt is met by λ_j = 0."""
    slack = ROUNDING * jnp.finfo(reach.dtype).eps * (scale.mag + jnp.abs(margins))
    return (margins > reach + slack) | ((margins >= reach - slack) & (reach > slack))


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_arguments(margins, beta, tol, max_iter):
    """Checks the arguments that are concrete here (API boundary); traced ones become Status.INVALID in the loop."""
    if _is_concrete(beta):
        b = np.asarray(beta, float)
        if b.size != 1 or not (np.isfinite(b) and b > 0):
            raise InvalidArgumentError(f"beta must be a positive finite number, got {b.squeeze()}")
    if _is_concrete(margins) and not np.all(np.isfinite(np.asarray(margins, float))):
        raise InvalidArgumentError(f"every margin must be finite, got {np.asarray(margins).tolist()}")
    if tol is not None and _is_concrete(tol) and not (np.isfinite(float(tol)) and float(tol) > 0):
        raise InvalidArgumentError(f"tol must be a positive finite number, got {tol}")
    if int(max_iter) < 1:
        raise InvalidArgumentError(f"max_iter must be at least 1, got {max_iter}")


def solve_dual(
    scores: Scores | Packed,
    margins: jnp.ndarray,
    beta,
    lam0: jnp.ndarray | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    block: int | None | str = "auto",
    warm_start: bool = True,
    dtype=None,
    devices: int | None = 1,
) -> DualResult:
    """Solves min_{λ≥0} D̂(λ) by projected Newton and certifies the answer.

    Args:
      scores: N prompts × K responses × m utilities (`Scores`); padded entries may hold any value. On CPU (one
        device, no log_prior) the solve packs them channel-major first (`packed.pack`, one copy); scores packed
        beforehand (`Packed`) skip that, and `block`/`devices` then do not apply.
      margins: [m] required improvements b over the reference policy.
      beta: KL weight β > 0 (traced: sweeps may vmap over it).
      lam0: [m] starting point (default zeros).
      tol: KKT residual tolerance, relative to each utility's within-prompt spread (default 1e-9 in float64,
        1e-5 in float32); raised to the data's precision floor where that is larger (`DualResult.tol`).
      max_iter: Newton iteration limit (static).
      block: prompts per scan block (static), see `dual_pass`.
      warm_start: on large data (≥ 64 blocks), start from the solution on 1/16 of the prompts (static).
      dtype: the precision to solve in (static); default the scores' own. float32 scores (half the memory, as
        `scores.from_grouped` keeps them) solve in float64 with dtype=jnp.float64, upcast block by block.
      devices: shard the prompts over this many local JAX devices (static; None: all of them). See
        `can_jax.dual.place`; the result's `devices` says how many were used.
    Returns:
      `DualResult`. Infeasible margins give status INFEASIBLE (never a silently huge λ). Concrete bad arguments
      (β ≤ 0 or not finite, NaN margins) raise `InvalidArgumentError`; traced ones (under jit/vmap) give INVALID.
    """
    _check_arguments(margins, beta, tol, max_iter)
    return solve_dual_jit(scores, margins, beta, lam0, tol, max_iter, block, warm_start, dtype, devices)


@fast_jit(static_argnames=("max_iter", "block", "warm_start", "dtype", "devices"))
def solve_dual_jit(
    scores: Scores | Packed,
    margins: jnp.ndarray,
    beta,
    lam0: jnp.ndarray | None = None,
    tol: float | None = None,
    max_iter: int = 100,
    block: int | None | str = "auto",
    warm_start: bool = True,
    dtype=None,
    devices: int | None = 1,
) -> DualResult:
    """`solve_dual` compiled (once per shape and static arguments). β, the margins and tol are traced here, so bad
    values of them give Status.INVALID instead of an error, as under any jit or vmap; max_iter < 1 still raises."""
    _check_arguments(margins, beta, tol, max_iter)
    if isinstance(scores, Packed):
        dtype = scores.x.dtype if dtype is None else jnp.dtype(dtype)
        m = scores.g_ref.shape[1]
        data = _Data(packed=cast(scores, dtype))
    else:
        dtype = scores.reward.dtype if dtype is None else jnp.dtype(dtype)
        m = scores.utility.shape[-1]
        n_devices = device_count(devices)
        if packable(scores, n_devices):
            data = _Data(packed=pack(scores, block, dtype))  # one copy, channel-major, each prompt shifted
        else:
            data = _Data(blocks=to_blocks(scores, block, n_devices))  # a reshape (a copy only where N needs padding)
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    beta = jnp.asarray(beta, dtype)
    tol = default_tol(dtype) if tol is None else tol
    lam0 = jnp.zeros((m,), dtype) if lam0 is None else jnp.maximum(jnp.asarray(lam0, dtype), 0.0)

    if warm_start and data.n_blocks() >= WARM_MIN_BLOCKS:
        # Solve first on every WARM_STRIDE-th block of prompts (1/16 of the data, at 1/16 of the cost per pass):
        # its λ* is within sampling error of the full one, from where full-data Newton needs ~3 passes, not ~6.
        sub = data.every(WARM_STRIDE)
        # (with the subsample's own units: only its λ is used.)
        st_sub, _ = _newton(sub, margins, beta, lam0, jnp.maximum(tol, 1e-6), max_iter, predict=False)
        lam0 = jnp.where(st_sub.status == Status.CONVERGED, st_sub.lam, lam0)
    # Margins at or beyond their reach (up to rounding) are only approached as λ → ∞: `_newton` stops at once.
    st, scale = _newton(data, margins, beta, lam0, tol, max_iter)
    # Jointly infeasible margins drive λ → ∞ along a direction u where D̂ falls linearly; the loop may stop there
    # on any status (DIVERGED, MAX_ITER, PRECISION, even CONVERGED once |λ| is so large that the rounding of λ
    # hides the gradient). The recession slope along λ/|λ| settles it: D̂ bounded below (feasible) means a slope
    # ≥ 0 in every direction, so a slope negative beyond rounding certifies infeasibility.
    # A normal CONVERGED solve (the requested tolerance met, not the precision floor) needs no such check.
    floor = _floor(st.lam, st.ev, margins, scale, tol)
    unfinished = (st.status == Status.DIVERGED) | (st.status == Status.MAX_ITER) | (st.status == Status.PRECISION)
    at_floor = (st.status == Status.CONVERGED) & jnp.any(floor > tol)
    checked = jnp.any(st.lam > 0) & (unfinished | at_floor)
    slope = jax.lax.cond(checked, lambda: data.slope(st.lam, margins), lambda: jnp.zeros((), dtype))
    u = st.lam / jnp.maximum(jnp.linalg.norm(st.lam), jnp.finfo(dtype).tiny)
    slope_noise = ROUNDING * jnp.finfo(dtype).eps * (u @ (scale.mag + jnp.abs(margins)))
    status = jnp.where(checked & (slope < -slope_noise), Status.INFEASIBLE, st.status)

    lam = st.lam
    active = lam > 0
    min_eig, cond = reduced_eigs(st.ev.hess, active)
    return DualResult(
        x=lam,
        fun=st.ev.value + scale.r_shift,
        jac=st.ev.grad,
        hess=st.ev.hess,
        nit=st.nit,
        nfev=st.nfev,
        status=status,
        kkt_residual=jnp.max(_scaled_kkt(lam, st.ev.grad, scale)),
        tol=floor,
        active=active,
        min_eig=min_eig,
        cond=cond,
        reach=st.ev.reach,
        slope=slope,
        # Gathered by the pass at λ (the loop's last accepted evaluation): ∇D̂ + b is the utility gain.
        predicted=Predicted(st.ev.reward_gain, st.ev.grad + margins, st.ev.kl, st.ev.ess),
    )


def _kkt_at(scores: Scores, margins, beta, lam, tol=None, dtype=None):
    """The scaled KKT residual of `DualResult.kkt_residual` at a given λ, and the precision floor there [m]:
    checks a λ read from elsewhere (a certificate) against the scores it claims to solve. `dtype` (static): the
    precision to check in (default the scores' own; float32 scores upcast block by block)."""
    dtype = scores.reward.dtype if dtype is None else jnp.dtype(dtype)
    m = scores.utility.shape[-1]
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    lam = jnp.asarray(lam, dtype)
    beta = jnp.asarray(beta, dtype)
    ev, units = pass_units(lam, to_blocks(scores), margins, beta, 2, centre=True, units=True, dtype=dtype)
    scale = _scale(units, margins)
    tol = default_tol(dtype) if tol is None else tol
    return jnp.max(_scaled_kkt(lam, ev.grad, scale)), _floor(lam, ev, margins, scale, tol)


kkt_at = jax.jit(_kkt_at, static_argnames=("dtype",))
kkt_at.__doc__ = _kkt_at.__doc__
