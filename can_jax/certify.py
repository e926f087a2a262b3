"""Certificates around a dual solution (DESIGN §2): KKT residual, strong convexity on the active set,
reachability of the margins, the recession slope that certifies infeasibility, and the predicted outcome."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from can_jax.dual import block_sum, masked, pass_units, reference_utility, shift_block, to_blocks
from can_jax.result import Predicted
from can_jax.scores import Scores, from_long


def kkt_residual(lam: jnp.ndarray, grad: jnp.ndarray) -> jnp.ndarray:
    """max_j |min(λ_j, ∇_j D̂)|: zero exactly at a KKT point of min_{λ≥0} D̂ (projected-gradient residual)."""
    return jnp.max(jnp.abs(jnp.minimum(lam, grad)))


def reduced_eigs(hess: jnp.ndarray, free: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Least eigenvalue and condition number of hess restricted to the `free` coordinates ([m] bool).

    With static shapes: the fixed block is replaced by ±M·I with M above the spectral radius, so the extreme
    eigenvalue of the padded matrix is that of the free block. An empty free set uses the whole Hessian.
    """
    free = jnp.where(jnp.any(free), free, True)
    both = free[:, None] & free[None, :]
    big = jnp.sqrt(jnp.sum(hess**2)) + 1.0  # Frobenius norm bounds every eigenvalue
    sub = jnp.where(both, hess, 0.0)
    lo = jnp.linalg.eigvalsh(sub + jnp.diag(jnp.where(free, 0.0, big)))[0]
    hi = jnp.linalg.eigvalsh(sub - jnp.diag(jnp.where(free, 0.0, big)))[-1]
    cond = jnp.where(lo > 0, hi / jnp.where(lo > 0, lo, 1.0), jnp.inf)
    return lo, cond


def _max_and_mean(block: Scores, u: jnp.ndarray, centre: bool = False):
    """Per-prompt max_k uᵀg_ik and E_ref[uᵀg | x_i] for each column of u [m, q]: both [B, q]."""
    block = shift_block(block)[0] if centre else masked(block)
    proj = jnp.einsum("nkj,jq->nkq", block.utility, u)
    mask = block.mask[..., None]
    top = jnp.max(jnp.where(mask, proj, -jnp.inf), axis=1)
    return top, reference_utility(block) @ u


@partial(jax.jit, static_argnames=("centre",))
def edge_gains(blocks: Scores, u: jnp.ndarray, centre: bool = False) -> jnp.ndarray:
    """mean_i [max_k uᵀg_ik − mean_k uᵀg_ik] for each column of u [m, q]: [q].

    The largest improvement in the direction u that any policy supported on the samples can reach (it puts
    all mass on the best sample of each prompt). With u = I this is each constraint's reach. `centre` centres
    each prompt's utilities first (the same gains, without the rounding of large per-prompt offsets).
    """

    def terms(block: Scores):
        top, mean = _max_and_mean(block, u, centre)
        valid = block.mask.any(axis=1)
        wt = jnp.where(valid, block.weight, 0.0)
        gap = jnp.where(valid[:, None], top - mean, 0.0)
        return wt.sum(), wt @ gap

    tot, gain = block_sum(terms, blocks)
    return gain / tot


@partial(jax.jit, static_argnames=("centre",))
def recession_slope(blocks: Scores, lam: jnp.ndarray, margins: jnp.ndarray, centre: bool = False) -> jnp.ndarray:
    """lim_{t→∞} D̂(t·u)/t along u = λ/|λ|₂: mean_i max_k uᵀg_ik − uᵀ(ḡ + b).

    Negative means D̂ → −∞ along u: a Farkas certificate that the margins are jointly out of reach, by −slope in
    the combination u. (0 when λ = 0.)
    """
    norm = jnp.linalg.norm(lam)
    u = jnp.where(norm > 0, lam / jnp.where(norm > 0, norm, 1.0), 0.0)
    return edge_gains(blocks, u[:, None], centre)[0] - u @ margins


@partial(jax.jit, static_argnames=("centre",))
def predicted_outcome(lam: jnp.ndarray, blocks: Scores, beta, centre: bool = False) -> Predicted:
    """Reward gain, utility gains, KL(π_λ‖π_ref) and effective sample fraction of π_λ on the samples (`centre`:
    each prompt shifted inside the pass, see `dual.shift_block`; blocks are cast to λ's precision)."""
    m = lam.shape[-1]
    zeros = jnp.zeros((m,), lam.dtype)
    ev = pass_units(lam, blocks, zeros, beta, 1, predict=True, centre=centre, dtype=lam.dtype)[0]
    return Predicted(ev.reward_gain, ev.grad, ev.kl, ev.ess)


def infeasibility_message(result, names: list[str], margins) -> str:
    """One line saying which margins are out of reach and by how much (call outside jit, on one result).

    Single margins beyond (or at the very edge of) their reach are named with their shortfall; otherwise the
    recession slope's direction names the combination that is jointly out of reach. A shortfall is never negative.
    """
    import numpy as np

    margins = np.asarray(margins, float)
    reach = np.asarray(result.reach, float)
    size = np.maximum(np.abs(reach), np.abs(margins))
    # The solver's test up to rounding: beyond the reach, or at the edge of a constraint that can move at all.
    over = (margins >= reach - 1e-9 * size) & ~((reach <= 1e-12 * size) & (margins <= 1e-9 * size))
    if over.any():
        parts = []
        for n, b, c, o in zip(names, margins, reach, over):
            if not o:
                continue
            if b > c:
                parts.append(f"{n!r} asks for {b:+.6g} but at most {c:+.6g} is reachable on these samples "
                             f"(short by {b - c:.3g})")  # fmt: skip
            else:
                parts.append(f"{n!r} asks for {b:+.6g}, the very edge of what these samples reach ({c:+.6g}), which "
                             "only an infinite λ attains")  # fmt: skip
        return "infeasible margins: " + "; ".join(parts)
    slope = float(result.slope)
    lam = np.asarray(result.x, float)
    if not slope < 0 or not np.any(lam > 0):
        return (
            "infeasible margins: the multipliers grow without bound; the margins are at the edge of what is reachable"
        )
    u = lam / np.linalg.norm(lam)
    combo = " + ".join(f"{w:.3g}·{n}" for w, n in zip(u, names) if w > 1e-6)
    return (
        "infeasible margins: each is reachable alone but not jointly; in the combination "
        f"{combo} the margins ask for {u @ margins:+.6g}, which exceeds what any policy on these samples "
        f"reaches by {-slope:.3g}"
    )


def tilt_gains(prompt_ids, s, g, beta: float):
    """[m] gains Σ_k w_ik g_ik − mean_k g_ik averaged over prompts, with w_i = softmax_k(s_ik / β): the outcome on the
    samples of the policy π ∝ π_ref exp(s/β) (DESIGN §2's predicted gains, through the same dual pass)."""
    import numpy as np

    ids = np.unique(np.asarray(prompt_ids), return_inverse=True)[1]
    g = np.asarray(g, float).reshape(len(ids), -1)
    sc = from_long(ids, np.asarray(s, float), g, dtype=jnp.float64)
    return np.asarray(predicted_outcome(jnp.zeros(g.shape[1]), to_blocks(sc), beta).utility_gain)
