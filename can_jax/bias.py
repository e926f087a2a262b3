"""Finite-K bias of the plug-in dual and bias-corrected intervals (DESIGN §7).

With K_i responses per prompt the per-prompt terms of D̂ are self-normalised (ratio) estimates: the log of a K-sample
mean of exp is biased low, and the π_λ weights' means are biased by O(1/K_i). So λ̂ is biased (too large, where
helpfulness trades against safety), not only noisy, and the predicted outcome of π_λ̂ is biased too (its KL is
capped at log K). Sandwich intervals, which only know the spread across prompts, then under-cover.

The correction is a within-prompt jackknife of the estimating equation, per prompt (ragged K_i are the normal case):
for every per-prompt quantity θ_i(λ) — the dual's gradient ψ_i = E_w[g] − ḡ_i − b, the reward gain and the KL —

    θ_i^J(λ) = K_i θ_i(λ) − (K_i − 1) · mean_k θ_i^{(−k)}(λ)        (θ^{(−k)}: response k of prompt i left out)

which removes the O(1/K_i) term of θ_i's bias. The corrected multipliers solve mean_i ψ_i^J(λ) = 0 (λ ≥ 0) by
projected Newton steps from λ̂ with that equation's own Jacobian; the predicted outcome is corrected at λ̂ itself. The
pseudo-values are independent across prompts, so their spread gives the standard errors. All leave-one-out terms come
in closed form from each prompt's sums, in about one pass. Why this and not a jackknife of whole solves or
cross-fitting: DESIGN §7 and benchmarks/coverage_bench.py.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.dual import cast, device_count, masked, one_block, scan_blocks, to_blocks
from can_jax.errors import InvalidArgumentError
from can_jax.scores import Scores

Z95 = 1.959963984540054


class Corrected(NamedTuple):
    """One estimate, plain and bias-corrected. Every field has the estimate's shape ([m] or scalar).

    plain: the plug-in estimate; bias: its estimated finite-K bias (plain − corrected); corrected; se: standard error
    of the corrected estimate (from the jackknife pseudo-values across prompts); se_plain: that of the plain one
    (the sandwich for λ). NaN where undefined (λ_j = 0 on the boundary, fewer than two prompts).
    """

    plain: jnp.ndarray
    bias: jnp.ndarray
    corrected: jnp.ndarray
    se: jnp.ndarray
    se_plain: jnp.ndarray


class BiasReport(NamedTuple):
    """Finite-K bias of the dual's estimates (DESIGN §7).

    lam [m]: λ̂ and the jackknife-corrected λ. utility_gain [m], reward_gain, kl: the predicted outcome of π_λ̂
    (E_π[g] − E_ref[g], E_π[r] − E_ref[r], KL(π ‖ π_ref)). prompts_corrected: prompts with K_i ≥ 2 (a prompt with
    one response cannot be jackknifed and enters uncorrected). steps: Newton steps taken on the corrected equation.
    """

    lam: Corrected
    utility_gain: Corrected
    reward_gain: Corrected
    kl: Corrected
    prompts_corrected: jnp.ndarray
    prompts: jnp.ndarray


def _centred(scores: Scores) -> Scores:
    """Per-prompt centred reward and utilities (padding zeroed). A per-prompt constant moves none of ψ_i, the reward
    gain or the KL, in the full prompt or in any leave-one-out subset; centring keeps the low bits of large offsets."""
    sc = masked(scores)
    mask = sc.mask
    k = jnp.maximum(mask.sum(axis=1), 1).astype(sc.reward.dtype)
    r_mean = sc.reward.sum(axis=1) / k  # [N]
    g_mean = sc.utility.sum(axis=1) / k[:, None]  # [N, m]
    reward = jnp.where(mask, sc.reward - r_mean[:, None], 0.0)
    utility = jnp.where(mask[..., None], sc.utility - g_mean[:, None, :], 0.0)
    ref = None if sc.ref_utility is None else sc.ref_utility - g_mean
    return sc._replace(reward=reward, utility=utility, ref_utility=ref)


def _free_inverse(hess, free):
    """H⁻¹ on the free coordinates, zero elsewhere: [m, m]."""
    both = free[:, None] & free[None, :]
    h = jnp.where(both, hess, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
    return jnp.where(both, jnp.linalg.inv(h), 0.0)


def _check(scores: Scores):
    if scores.log_prior is not None:
        raise InvalidArgumentError(
            "the finite-K jackknife needs equally weighted samples from π_ref (scores without log_prior); with exact "
            "base weights (a finite world) the dual has no finite-K bias"
        )


class _Moments(NamedTuple):
    """Weighted count, mean [d] and centred sum of squares [d, d] of per-prompt values, merged block by block (Chan
    et al.'s pairwise update: no cancellation however large the mean)."""

    n: jnp.ndarray
    mean: jnp.ndarray
    m2: jnp.ndarray


def _moments(x, wt) -> _Moments:
    n = jnp.sum(wt)
    mean = wt @ x / jnp.where(n > 0, n, 1.0)
    d = x - mean
    return _Moments(n, mean, jnp.einsum("n,ni,nj->ij", wt, d, d))


def _merge(a: _Moments, b: _Moments) -> _Moments:
    n = a.n + b.n
    n_safe = jnp.where(n > 0, n, 1.0)
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n_safe)
    return _Moments(n, mean, a.m2 + b.m2 + jnp.outer(delta, delta) * (a.n * b.n / n_safe))


def _jack_block(lam, sc: Scores, margins, beta, first: bool):
    """The jackknifed estimating equation of one block of centred prompts at λ, from per-prompt sums (no [B, K, m]
    leave-one-out array, no autodiff): Σ_i wt_i ψ_i^J [m] and its Jacobian Σ_i wt_i ∂ψ_i^J/∂λ [m, m]; with `first`
    also the moments of θ_i and θ_i^J across the block's prompts and the plain Hessian Σ_i wt_i Cov_{w_i}(g)/β.

    With e_l = exp(s_l − max) and z = Σ e, leaving out a response k that is not the heaviest gives z_k = z − e_k ≥ 1
    and Σ_{l≠k} e_l q_l = T_q − e_k q_k, so with a_k = 1/z_k

        Σ_k E^(−k)[q] = T_q Σ_k a_k − Σ_k a_k e_k q_k                      (k over the non-heaviest responses)
        Σ_k Cov^(−k)(g) = S₂ Σ_k a_k − Σ_k (a_k e_k + a_k² e_k²) g_k g_kᵀ − T Tᵀ Σ_k a_k² + T uᵀ + u Tᵀ,
                          u = Σ_k a_k² e_k g_k,  S₂ = Σ_l e_l g_l g_lᵀ

    and the heaviest response's leave-one-out terms are taken afresh over the others, shifted by their own maximum (so
    nothing underflows to 0/0 when one response carries all the weight). The g gᵀ terms of every prompt fold into one
    Gram matrix per block. ∂E^(−k)[g]/∂λ = Cov^(−k)(g)/β: the Jacobian is the one
    forward-mode autodiff would give through the same closed form (tested against it), in one pass.
    """
    mask, g = sc.mask, sc.utility
    m = g.shape[-1]
    dtype = sc.reward.dtype
    r = sc.reward
    kint = mask.sum(axis=1)
    kf = jnp.maximum(kint, 1).astype(dtype)
    valid = kint > 0
    two = kint >= 2
    wt = jnp.where(valid, sc.weight, 0.0)
    s = (r + sum(lam[j] * g[..., j] for j in range(m))) / beta
    s_in = jnp.where(mask, s, -jnp.inf)
    is_top = (jnp.arange(mask.shape[1]) == jnp.argmax(s_in, axis=1)[:, None]) & mask
    top = jnp.max(s_in, axis=1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, s - top[:, None], 0.0)), 0.0)
    z = e.sum(axis=1)
    z_safe = jnp.where(z > 0, z, 1.0)
    rest = mask & ~is_top
    top2 = jnp.max(jnp.where(rest, s, -jnp.inf), axis=1)
    top2 = jnp.where(jnp.isfinite(top2), top2, 0.0)
    # e_l · exp(top − top2) = exp(s_l − top2) saves an exp per response. It loses nothing unless e_l underflowed (a
    # gap near the dtype's exponent range, where e_l of a response that matters beside the second heaviest would lose
    # bits); such a block takes the exponentials afresh.
    gap = jnp.where(rest.any(axis=1), top - top2, 0.0)
    e2 = jax.lax.cond(
        jnp.any(gap > -np.log(np.finfo(dtype).tiny) - 40.0),
        lambda: jnp.where(rest, jnp.exp(jnp.where(rest, s - top2[:, None], 0.0)), 0.0),
        lambda: jnp.where(rest, e * jnp.exp(gap)[:, None], 0.0),
    )
    z2 = e2.sum(axis=1)
    z2_safe = jnp.where(z2 > 0, z2, 1.0)
    zk = jnp.where(rest, z[:, None] - e, 1.0)
    a = jnp.where(rest, 1.0 / zk, 0.0)
    ae = a * e
    a_sum, a2_sum = a.sum(axis=1), (a * a).sum(axis=1)
    cols = [g[..., j] for j in range(m)] + ([r, s] if first else [])  # q = (g, r, s) as [B, K] slices
    # Five weighted sums over k of q; as separate reductions (XLA CPU runs them ~2x faster than one batched einsum
    # with a 5-wide contraction-free axis).
    t_q, aeq, u_q, t2_q, q_sum = (
        jnp.stack([(cf * c).sum(axis=1) for c in cols], axis=-1) for cf in (e, ae, a * ae, e2, 1.0)
    )
    mu_q = t_q / z_safe[:, None]  # E_w[q]
    mu2_q = t2_q / z2_safe[:, None]  # E^(−top)[q]
    loo_sum = t_q * a_sum[:, None] - aeq + mu2_q  # Σ_k E^(−k)[q] over the K_i responses (K_i ≥ 2)
    g_ref = q_sum[:, :m] / kf[:, None] if sc.ref_utility is None else sc.ref_utility
    mu, mu2, t_g, u_g = mu_q[:, :m], mu2_q[:, :m], t_q[:, :m], u_q[:, :m]
    psi = jnp.where(valid[:, None], mu - g_ref - margins, 0.0)
    # mean_k ψ^(−k): mean_k E^(−k)[g] − mean_k ḡ^(−k) − b, and mean_k ḡ^(−k) = ḡ (or the supplied E_ref[g]).
    loo_psi = loo_sum[:, :m] / kf[:, None] - g_ref - margins
    k_col = kf[:, None]
    psi_j = jnp.where(two[:, None], k_col * psi - (k_col - 1.0) * loo_psi, psi)
    out = {"psi": wt @ psi_j}

    # Jacobian: Σ_i wt_i [K_i Cov_w(g) − (K_i − 1)/K_i Σ_k Cov^(−k)(g)] / β (K_i ≥ 2), wt_i Cov_w(g)/β otherwise.
    shrink = jnp.where(two, (kf - 1.0) / kf, 0.0)
    k_eff = jnp.where(two, kf, 1.0)
    w = e / z_safe[:, None]
    loo_coef = e * a_sum[:, None] - ae - ae * ae + e2 / z2_safe[:, None]
    c = (wt / beta)[:, None] * (k_eff[:, None] * w - shrink[:, None] * loo_coef)
    gram = (c[..., None] * g).reshape(-1, m).T @ g.reshape(-1, m)
    outer = jnp.einsum  # per-prompt rank-one terms, summed with the prompt weights
    tu = outer("n,ni,nj->ij", wt * shrink * a2_sum, t_g, t_g) - outer("n,ni,nj->ij", wt * shrink, t_g, u_g)
    rank1 = (
        -outer("n,ni,nj->ij", wt * k_eff, mu, mu)
        + tu
        - outer("n,ni,nj->ij", wt * shrink, u_g, t_g)
        + outer("n,ni,nj->ij", wt * shrink, mu2, mu2)
    )
    out["jac"] = gram + rank1 / beta
    if not first:
        return out

    # θ_i = [ψ_i, reward gain, KL] and the pseudo-values θ_i^J of the module docstring.
    wr = mu_q[:, m]
    r_ref = q_sum[:, m] / kf
    lse = top + jnp.log(z_safe)
    kl = jnp.log(kf) + (wr + mu @ lam) / beta - lse
    theta = jnp.where(valid[:, None], jnp.concatenate([psi, (wr - r_ref)[:, None], kl[:, None]], axis=1), 0.0)
    km1 = jnp.maximum(kf - 1.0, 1.0)
    lse_sum = jnp.sum(jnp.where(rest, top[:, None] + jnp.log(zk), 0.0), axis=1) + top2 + jnp.log(z2_safe)
    loo_r = loo_sum[:, m] / kf - r_ref  # mean_k [E^(−k)[r] − r̄^(−k)], mean_k r̄^(−k) = r̄
    loo_kl = jnp.log(km1) + loo_sum[:, m + 1] / kf - lse_sum / kf
    loo = jnp.concatenate([loo_psi, loo_r[:, None], loo_kl[:, None]], axis=1)
    jack = jnp.where(two[:, None], k_col * theta - (k_col - 1.0) * loo, theta)
    ds = (jnp.sqrt(wt[:, None] * w)[..., None] * (g - mu[:, None, :])).reshape(-1, m)
    out["hess"] = ds.T @ ds / beta  # Σ_i wt_i Σ_k w_ik d_ik d_ikᵀ as one Gram matrix, as in the dual's pass
    out["theta"] = _moments(theta, wt)
    out["jack"] = _moments(jack, wt)
    out["count"] = jnp.sum(wt > 0)
    out["corrected"] = jnp.sum((wt > 0) & two)
    return out


def block_pass(lam, blocks: Scores, margins, beta, first: bool):
    """One scan over the prompt blocks at λ (see `_jack_block`): memory is that of one block, never N·K·(m + 2).
    Blocks in another precision than λ's are cast block by block; sharded blocks scan on their devices."""

    def block_terms(block: Scores):
        return _jack_block(lam, _centred(cast(block, lam.dtype)), margins, beta, first)

    shapes = jax.eval_shape(block_terms, one_block(blocks))
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

    def merge(carry, new):
        return {k: (_merge(carry[k], v) if k in ("theta", "jack") else carry[k] + v) for k, v in new.items()}

    def step(carry, block):
        return merge(carry, block_terms(block)), None

    return scan_blocks(step, init, blocks, merge)[0]


@partial(jax.jit, static_argnames=("steps", "block", "dtype", "devices"))
def finite_k_bias(
    lam, scores: Scores, margins, beta, steps: int = 3, block="auto", dtype=None, devices: int | None = 1
) -> BiasReport:
    """Bias estimates, corrected estimates and standard errors for λ̂ and the predicted outcome of π_λ̂.

    Args:
      lam: [m] λ̂ ≥ 0, the plug-in solution (`solve_dual(...).x`).  scores: N prompts × K responses (no log_prior).
      margins: [m] b.  beta: β > 0.
      steps: projected Newton steps on the jackknifed equation mean_i ψ_i^J(λ) = 0, from λ̂ (static; 2 and 4 steps
        differ by under 2% of the bias at K = 4, measured in an exact world).
      block: prompts per scan block (static), see `dual_pass`.
      dtype: the precision to compute in (static; default the scores' own: float32 scores upcast block by block).
      devices: shard the prompts over this many local devices (static; None: all), as `solve_dual`.
    Returns:
      `BiasReport`. Standard errors are NaN where undefined: λ_j = 0 (the boundary) or fewer than two prompts.

    Cost: `steps` blocked passes over the scores (the first, at λ̂, also gathers the moments of θ_i and θ_i^J and the
    plain Hessian), each the closed-form leave-one-out terms of one block and their forward-mode Jacobian; memory is
    the table plus one block's temporaries.
    """
    _check(scores)
    dtype = scores.reward.dtype if dtype is None else jnp.dtype(dtype)
    m = scores.utility.shape[-1]
    lam = jnp.asarray(lam, dtype)
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    beta = jnp.asarray(beta, dtype)
    blocks = to_blocks(scores, block, device_count(devices))

    acc = block_pass(lam, blocks, margins, beta, True)
    th, jk = acc["theta"], acc["jack"]
    n_prompts = acc["count"]
    tot = jnp.maximum(th.n, jnp.finfo(dtype).tiny)
    n_safe = jnp.where(th.n > 0, th.n, 1.0)
    plain, cov_plain = th.mean, th.m2 / n_safe / n_safe
    corr, cov_jack = jk.mean, jk.m2 / n_safe / n_safe
    hess = acc["hess"] / tot

    def newton(lam_t, psi_sum, jac_sum):
        # Newton on the jackknifed equation with its own Jacobian (forward mode through the leave-one-out terms,
        # m directions). The plain Hessian is not it: at small K their ratio reaches ~3, and a step with H
        # overshoots λ* by more than the bias it removes (measured at K = 4). Where the jackknifed Jacobian is not
        # positive definite on the free set (tiny K_i, noisy), the plain Hessian stands in.
        psi_j = psi_sum / tot
        jac = jac_sum / tot
        jac = 0.5 * (jac + jac.T)
        free = (lam_t > 0) | (psi_j < 0)
        both = free[:, None] & free[None, :]
        lo = jnp.linalg.eigvalsh(jnp.where(both, jac, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0)))[0]
        j_use = jnp.where(lo > 0, jac, hess)
        return jnp.maximum(lam_t - _free_inverse(j_use, free) @ jnp.where(free, psi_j, 0.0), 0.0), j_use

    if steps < 1:
        lam_c, jac_c = lam, hess
    else:
        lam_c, jac_c = newton(lam, acc["psi"], acc["jac"])

        def step(carry, _):
            lam_t, _ = carry
            a = block_pass(lam_t, blocks, margins, beta, False)
            return newton(lam_t, a["psi"], a["jac"]), None

        if steps > 1:
            lam_c, jac_c = jax.lax.scan(step, (lam_c, jac_c), None, length=steps - 1)[0]

    enough = n_prompts >= 2

    def lam_se(at, cov_psi, jac):
        # λ̂_c solves the jackknifed equation, so its sandwich has that equation's Jacobian for its bread.
        h_inv = _free_inverse(jac, at > 0)
        se = jnp.sqrt(jnp.maximum(jnp.diag(h_inv @ cov_psi[:m, :m] @ h_inv), 0.0))
        return jnp.where((at > 0) & enough, se, jnp.nan)

    se_plain = jnp.where(enough, jnp.sqrt(jnp.maximum(jnp.diag(cov_plain), 0.0)), jnp.nan)
    se_jack = jnp.where(enough, jnp.sqrt(jnp.maximum(jnp.diag(cov_jack), 0.0)), jnp.nan)
    lam_block = Corrected(lam, lam - lam_c, lam_c, lam_se(lam_c, cov_jack, jac_c), lam_se(lam, cov_plain, hess))
    # Utility gain = ψ + b: the margin shifts plain and corrected alike.
    gain = Corrected(plain[:m] + margins, plain[:m] - corr[:m], corr[:m] + margins, se_jack[:m], se_plain[:m])

    def scalar(i):
        return Corrected(plain[i], plain[i] - corr[i], corr[i], se_jack[i], se_plain[i])

    return BiasReport(
        lam=lam_block,
        utility_gain=gain,
        reward_gain=scalar(m),
        kl=scalar(m + 1),
        prompts_corrected=acc["corrected"],
        prompts=n_prompts,
    )


finite_k_bias_jit = finite_k_bias  # its earlier name: finite_k_bias is compiled itself


def interval(c: Corrected, corrected: bool = True, z: float = Z95) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(low, high): the corrected estimate ± z·se (default), or the plain one ± z·se_plain."""
    centre, se = (c.corrected, c.se) if corrected else (c.plain, c.se_plain)
    return centre - z * se, centre + z * se
