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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.dual import cast, device_count, masked, one_block, scan_blocks, to_blocks
from can_jax.errors import InvalidArgumentError
from can_jax.packed import Packed, fast_jit, pack, packable
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


def _rank_one(wt, shrink, k_eff, a2_sum, t_g, u_g, mu, mu2):
    """The jackknifed Jacobian's per-prompt rank-one terms summed with the prompt weights, [m, m]: β times the
    Jacobian less its Gram part (see `_jack_block`). Arguments [B] or [B, m]."""
    outer = jnp.einsum
    tu = outer("n,ni,nj->ij", wt * shrink * a2_sum, t_g, t_g) - outer("n,ni,nj->ij", wt * shrink, t_g, u_g)
    return (
        -outer("n,ni,nj->ij", wt * k_eff, mu, mu)
        + tu
        - outer("n,ni,nj->ij", wt * shrink, u_g, t_g)
        + outer("n,ni,nj->ij", wt * shrink, mu2, mu2)
    )


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
    out["jac"] = gram + _rank_one(wt, shrink, k_eff, a2_sum, t_g, u_g, mu, mu2) / beta
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


def _top_two(s_in):
    """Per row of s_in [B, K]: the maximum, its index (the first of ties, as argmax) and the maximum of the others,
    in one variadic reduction (an argmax and a masked max are each a slow reduction on XLA CPU)."""
    k = s_in.shape[-1]
    iota = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), s_in.shape)
    ninf = jnp.asarray(-jnp.inf, s_in.dtype)

    def keep(a, b):
        m1a, ia, m2a = a
        m1b, ib, m2b = b
        a_wins = (m1a > m1b) | ((m1a == m1b) & (ia < ib))
        second = jnp.where(a_wins, jnp.maximum(m2a, m1b), jnp.maximum(m1a, m2b))
        return jnp.where(a_wins, m1a, m1b), jnp.where(a_wins, ia, ib), second

    init = (ninf, jnp.asarray(k, jnp.int32), ninf)
    return jax.lax.reduce((s_in, iota, jnp.full_like(s_in, -jnp.inf)), init, keep, (1,))


def _jack_packed(lam, xb, mb, wt, kf, g_ref, r_ref, margins, beta, first: bool):
    """`_jack_block` on one block of packed scores (`packed.Packed`: channels y = (r, g) [m+1, B, K], each prompt
    shifted by its first real response, which moves none of the terms). The same formulas, with every sum over k one
    variadic reduction: the responses other than the heaviest are weighted by f = exp(s − top2) ≤ 1 (their own
    maximum is 1, so nothing underflows), and e = ρ f with ρ = exp(top2 − top); the heaviest response enters through
    its gathered scores. Returns the sums of `_jack_block` and, with `first`, the per-prompt θ_i and θ_i^J [B, m+2]."""
    ch = xb.shape[0]
    m = ch - 1
    dtype = xb.dtype
    coef = jnp.concatenate([jnp.ones((1,), dtype), lam]) / beta
    valid = kf > 0
    two = kf >= 2
    kf = jnp.maximum(kf, 1.0)
    s = sum(coef[c] * xb[c] for c in range(ch))  # [B, K]
    top, idx, top2 = _top_two(jnp.where(mb, s, -jnp.inf))  # idx: the heaviest response (the first of ties)
    y_top = jnp.take_along_axis(xb, idx[None, :, None], axis=2)[..., 0]  # [m+1, B]
    top = jnp.where(valid, top, 0.0)
    rest = mb & (jnp.arange(mb.shape[1]) != idx[:, None])
    has_rest = rest.any(axis=1)
    top2 = jnp.where(has_rest, top2, 0.0)
    rho = jnp.where(has_rest, jnp.exp(top2 - top), 0.0)
    f = jnp.where(rest, jnp.exp(jnp.where(rest, s - top2[:, None], 0.0)), 0.0)
    big_f = f.sum(axis=1)
    z = jnp.where(valid, 1.0 + rho * big_f, 1.0)
    a = jnp.where(rest, 1.0 / jnp.where(rest, z[:, None] - rho[:, None] * f, 1.0), 0.0)
    ae = a * rho[:, None] * f
    pairs = [(j, l) for j in range(1, ch) for l in range(j, ch)]
    ops = (
        [f * xb[c] for c in range(ch)]  # Σ f y
        + [a * f * xb[c] for c in range(ch)]  # Σ a f y
        + [a * a * f * xb[c] for c in range(1, ch)]  # Σ a² f g
        + [a, a * a, jnp.where(rest, jnp.log(jnp.where(rest, z[:, None] - rho[:, None] * f, 1.0)), 0.0)]
        + [f * xb[j] * xb[l] for j, l in pairs]  # Σ f g gᵀ
        + [(ae + ae * ae) * xb[j] * xb[l] for j, l in pairs]  # Σ (ae + ae²) g gᵀ
    )
    zero = jnp.zeros((), dtype)
    sums = jax.lax.reduce(tuple(ops), (zero,) * len(ops), lambda u, v: tuple(p + q for p, q in zip(u, v)), (1,))
    fy, afy, a2fg = jnp.stack(sums[:ch]), jnp.stack(sums[ch : 2 * ch]), jnp.stack(sums[2 * ch : 3 * ch - 1])
    a_sum, a2_sum, log_zk = sums[3 * ch - 1 : 3 * ch + 2]
    np_ = len(pairs)
    fgg, wgg = jnp.stack(sums[3 * ch + 2 : 3 * ch + 2 + np_]), jnp.stack(sums[3 * ch + 2 + np_ :])  # [P, B]

    def full(upper):  # [P, B] upper triangles -> [B, m, m]
        rows, cols = (jnp.asarray(v) - 1 for v in zip(*pairs))
        mat = jnp.zeros((upper.shape[1], m, m), dtype).at[:, rows, cols].set(upper.T)
        return mat + jnp.triu(mat, 1).transpose(0, 2, 1)

    f_safe = jnp.where(big_f > 0, big_f, 1.0)
    t_y = y_top + rho * fy  # Σ_k e_k y_k
    mu_y = t_y / z  # E_w[y]
    mu2_y = fy / f_safe  # E^(−top)[y]
    loo_y = t_y * a_sum - rho * afy + mu2_y  # Σ_k E^(−k)[y]
    mu, mu2, t_g = mu_y[1:].T, mu2_y[1:].T, t_y[1:].T  # [B, m]
    u_g = (rho * a2fg).T
    psi = jnp.where(valid[:, None], mu - g_ref - margins, 0.0)
    loo_psi = loo_y[1:].T / kf[:, None] - g_ref - margins
    k_col = kf[:, None]
    psi_j = jnp.where(two[:, None], k_col * psi - (k_col - 1.0) * loo_psi, psi)
    out = {"psi": wt @ psi_j}

    shrink = jnp.where(two, (kf - 1.0) / kf, 0.0)
    k_eff = jnp.where(two, kf, 1.0)
    gg_top = y_top[1:].T[:, :, None] * y_top[1:].T[:, None, :]  # [B, m, m]
    e_gg = gg_top + rho[:, None, None] * full(fgg)  # Σ_k e_k g gᵀ
    loo_gg = a_sum[:, None, None] * e_gg - full(wgg) + full(fgg) / f_safe[:, None, None]
    c_full = (k_eff / z)[:, None, None] * e_gg - shrink[:, None, None] * loo_gg
    gram = jnp.einsum("b,bij->ij", wt / beta, c_full)
    out["jac"] = gram + _rank_one(wt, shrink, k_eff, a2_sum, t_g, u_g, mu, mu2) / beta
    if not first:
        return out, None

    wr = mu_y[0]
    lse = top + jnp.log(z)
    kl = jnp.log(kf) + (wr + mu @ lam) / beta - lse
    theta = jnp.where(valid[:, None], jnp.concatenate([psi, (wr - r_ref)[:, None], kl[:, None]], axis=1), 0.0)
    km1 = jnp.maximum(kf - 1.0, 1.0)
    n_rest = jnp.sum(rest, axis=1).astype(dtype)
    lse_sum = n_rest * top + log_zk + top2 + jnp.log(f_safe)
    loo_s = coef @ loo_y  # s is linear in the channels
    loo_r = loo_y[0] / kf - r_ref
    loo_kl = jnp.log(km1) + loo_s / kf - lse_sum / kf
    loo = jnp.concatenate([loo_psi, loo_r[:, None], loo_kl[:, None]], axis=1)
    jack = jnp.where(two[:, None], k_col * theta - (k_col - 1.0) * loo, theta)
    hess = e_gg / z[:, None, None] - mu[:, :, None] * mu[:, None, :]
    out["hess"] = jnp.einsum("b,bij->ij", wt, hess) / beta
    out["count"] = jnp.sum(wt > 0)
    out["corrected"] = jnp.sum((wt > 0) & two)
    return out, (theta, jack)


def packed_block_pass(lam, packed: Packed, margins, beta, first: bool):
    """`blocked_pass` on packed scores: one scan over the blocks, each block's sums in one variadic reduction per stage
    (its maximum, then the sums of `_jack_packed`); the θ moments over all prompts at the end."""
    dtype = packed.x.dtype
    lam = lam.astype(dtype)
    g_ref = jnp.moveaxis(packed.g_ref, 1, 2)  # [C, B, m]

    def step(carry, blk):
        xb, mb, wb, kb, gb, rb = blk
        out, per = _jack_packed(lam, xb, mb, wb, kb, gb, rb, margins, beta, first)
        return jax.tree.map(jnp.add, carry, out), per

    shapes = jax.eval_shape(
        lambda *b: _jack_packed(lam, *b, margins, beta, first)[0],
        *(a[0] for a in (packed.x, packed.mask, packed.weight, packed.count, g_ref, packed.r_ref)),
    )
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    acc, per = jax.lax.scan(step, init, (packed.x, packed.mask, packed.weight, packed.count, g_ref, packed.r_ref))
    if first:
        theta, jack = (p.reshape(-1, p.shape[-1]) for p in per)
        wt = packed.weight.reshape(-1)
        acc["theta"], acc["jack"] = _moments(theta, wt), _moments(jack, wt)
    return acc


def blocked_pass(lam, blocks: Scores, margins, beta, first: bool):
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


@fast_jit(static_argnames=("steps", "block", "dtype", "devices"))
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
    if isinstance(scores, Packed):
        dtype = scores.x.dtype if dtype is None else jnp.dtype(dtype)
        m = scores.g_ref.shape[1]
        data = cast(scores, dtype)
    else:
        _check(scores)
        dtype = scores.reward.dtype if dtype is None else jnp.dtype(dtype)
        m = scores.utility.shape[-1]
        n_devices = device_count(devices)
        data = pack(scores, block, dtype) if packable(scores, n_devices) else to_blocks(scores, block, n_devices)
    lam = jnp.asarray(lam, dtype)
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    beta = jnp.asarray(beta, dtype)

    def block_pass(at, first):
        if isinstance(data, Packed):
            return packed_block_pass(at, data, margins, beta, first)
        return blocked_pass(at, data, margins, beta, first)

    acc = block_pass(lam, True)
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
            a = block_pass(lam_t, False)
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
