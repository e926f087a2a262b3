"""The finite-K bias's per-prompt terms written unblocked, one formula at a time (`can_jax.bias` fuses them into
a blocked pass): θ_i(λ), the closed-form leave-one-out means (checked against brute force in test_bias.py), and the
jackknife pseudo-values the blocked pass is checked against."""

from __future__ import annotations

import jax.numpy as jnp

from can_jax.bias import Corrected
from can_jax.dual import prompt_terms
from can_jax.scores import Scores


def outcome_terms(lam, scores: Scores, margins, beta) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-prompt θ_i(λ) = [ψ_i (m), reward gain, KL] and which prompts have a response: ([N, m + 2], [N] bool).

    ψ_i = E_{w_i}[g] − ḡ_i − b (∇ℓ_i of DESIGN §2), reward gain E_{w_i}[r] − r̄_i, KL_i = Σ_k w_ik log(K_i w_ik).
    """
    t = prompt_terms(lam, scores, margins, beta, 1)
    reward = jnp.where(scores.mask, scores.reward, 0.0)
    wr = (t.w * reward).sum(axis=1)
    # KL_i = log K_i + Σ_k w s − lse with Σ_k w s = (Σ_k w r + λᵀμ_i)/β (as in the fused pass, dual.py).
    kl = t.log_norm + (wr + t.mu @ lam) / beta - t.lse
    theta = jnp.concatenate([t.grad, (wr - t.r_ref)[:, None], kl[:, None]], axis=1)
    return jnp.where(t.valid[:, None], theta, 0.0), t.valid


def leave_one_out_mean(lam, scores: Scores, margins, beta) -> jnp.ndarray:
    """mean_k θ_i^{(−k)}(λ) over the K_i responses of each prompt: [N, m + 2] (θ_i itself where K_i < 2).

    In closed form from the full prompt's sums, so all K_i leave-one-out terms cost about one pass: with
    e_l = exp(s_l − max), Σ_{l≠k} e_l q_l = Σ_l e_l q_l − e_k q_k. Dropping the heaviest response is the one case
    where that subtraction cancels (w_k → 1, as with a small β): its sums are taken afresh over the other responses,
    shifted by their own maximum, so nothing underflows to 0/0.
    """
    mask = scores.mask
    dtype = scores.reward.dtype
    m = scores.utility.shape[-1]
    reward = jnp.where(mask, scores.reward, 0.0)  # [N, K]
    utility = jnp.where(mask[..., None], scores.utility, 0.0)  # [N, K, m]
    s = (reward + utility @ lam) / beta  # [N, K]
    q = jnp.concatenate([utility, reward[..., None], s[..., None]], axis=-1)  # [N, K, m + 2]
    k_i = mask.sum(axis=1)
    kf = jnp.maximum(k_i, 1).astype(dtype)

    s_in = jnp.where(mask, s, -jnp.inf)
    top_idx = jnp.argmax(s_in, axis=1)
    is_top = (jnp.arange(mask.shape[1]) == top_idx[:, None]) & mask  # [N, K] the heaviest response
    top = jnp.max(jnp.where(mask, s, -jnp.inf), axis=1)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, s - top[:, None], 0.0)), 0.0)
    z = e.sum(axis=1)  # [N]
    t = jnp.einsum("nk,nkq->nq", e, q)  # [N, m + 2]
    rest = mask & ~is_top
    top2 = jnp.max(jnp.where(rest, s, -jnp.inf), axis=1)
    top2 = jnp.where(jnp.isfinite(top2), top2, 0.0)
    e2 = jnp.where(rest, jnp.exp(jnp.where(rest, s - top2[:, None], 0.0)), 0.0)
    z2 = e2.sum(axis=1)
    t2 = jnp.einsum("nk,nkq->nq", e2, q)

    z_k = jnp.where(is_top, z2[:, None], z[:, None] - e)  # [N, K] Σ_{l≠k} e_l (in the shift of its own case)
    t_k = jnp.where(is_top[..., None], t2[:, None, :], t[:, None, :] - e[..., None] * q)  # [N, K, m + 2]
    shift = jnp.where(is_top, top2[:, None], top[:, None])
    ok = mask & (k_i >= 2)[:, None] & (z_k > 0)
    z_safe = jnp.where(ok, z_k, 1.0)
    means = t_k / z_safe[..., None]  # E_{w^(−k)}[g], E_{w^(−k)}[r], E_{w^(−k)}[s]
    lse_k = shift + jnp.log(z_safe)

    km1 = jnp.maximum(kf - 1.0, 1.0)[:, None]
    if scores.ref_utility is None:
        g_ref = (utility.sum(axis=1)[:, None, :] - utility) / km1[..., None]  # [N, K, m]
    else:
        g_ref = jnp.broadcast_to(scores.ref_utility[:, None, :], utility.shape)
    r_ref = (reward.sum(axis=1)[:, None] - reward) / km1
    psi = means[..., :m] - g_ref - margins
    gain_r = means[..., m] - r_ref
    kl = jnp.log(km1) + means[..., m + 1] - lse_k
    loo = jnp.concatenate([psi, gain_r[..., None], kl[..., None]], axis=-1)  # [N, K, m + 2]
    mean = jnp.where(ok[..., None], loo, 0.0).sum(axis=1) / kf[:, None]
    theta, _ = outcome_terms(lam, scores, margins, beta)
    return jnp.where((k_i >= 2)[:, None], mean, theta)


def pseudo_values(lam, scores: Scores, margins, beta) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Plain θ_i, jackknife pseudo-values θ_i^J = K_i θ_i − (K_i − 1) mean_k θ_i^{(−k)}, and prompt weights.

    Returns ([N, m + 2], [N, m + 2], [N]); the weights are 0 for prompts without responses (and padding).
    """
    theta, valid = outcome_terms(lam, scores, margins, beta)
    loo = leave_one_out_mean(lam, scores, margins, beta)
    k_i = scores.mask.sum(axis=1).astype(theta.dtype)[:, None]
    jack = jnp.where(k_i >= 2, k_i * theta - (k_i - 1.0) * loo, theta)
    return theta, jack, jnp.where(valid, scores.weight, 0.0)


def bias_ratio(c: Corrected) -> jnp.ndarray:
    """|bias| / se_plain: how many of the plain estimate's standard errors its finite-K bias is (NaN: undefined)."""
    return jnp.abs(c.bias) / c.se_plain
