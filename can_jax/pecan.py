"""PeCAN (DESIGN §3): the dual from pre-aligned models' log-ratios instead of reward and cost models.

With π_θr aligned to helpfulness only (DPO, KL weight β_r) and π_θgj to safety j only (β_gj), Bradley–Terry gives
r = β_r ℓ_r + β_r log Z_r(x) and g_j = β_gj ℓ_gj + β_gj log Z_gj(x), where ℓ = log π_θ(y|x) − log π_ref(y|x) on
responses sampled from π_ref. The log Z(x) are per-prompt constants, which leave λ* unchanged, so PeCAN is the
MoCAN dual on r̃ = β_r ℓ_r, g̃_j = β_gj ℓ_gj — the same dual core, not a copy — with E_ref[g̃_j | x] either the sample
mean or −β_gj KL(π_ref ‖ π_θgj)(x) from a lower-variance estimate. Pseudo-labels then use s = r̃ + λ*ᵀg̃.
"""

from __future__ import annotations

import jax.numpy as jnp

from can_jax.scores import Scores


def pecan_scores(
    logratio_reward: jnp.ndarray,
    logratio_utility: jnp.ndarray,
    beta_reward,
    beta_utility,
    mask: jnp.ndarray | None = None,
    kl_ref: jnp.ndarray | None = None,
    weight: jnp.ndarray | None = None,
) -> Scores:
    """Scores for the PeCAN dual.

    Args:
      logratio_reward: [N, K] ℓ_r = log π_θr − log π_ref of each sampled response.
      logratio_utility: [N, K, m] ℓ_gj for each safety-aligned model.
      beta_reward: β_r.  beta_utility: [m] β_gj (or a scalar).
      mask: [N, K] real responses (default all).  weight: [N] prompt weights (default ones).
      kl_ref: optional [N, m] KL(π_ref ‖ π_θgj)(x_i); given, E_ref[g̃_j | x_i] = −β_gj·kl_ref (DESIGN §3),
        otherwise the sample mean of g̃ over the responses.
    """
    n, k = logratio_reward.shape
    m = logratio_utility.shape[-1]
    beta_utility = jnp.broadcast_to(jnp.asarray(beta_utility, logratio_reward.dtype), (m,))
    mask = jnp.ones((n, k), bool) if mask is None else mask
    reward = jnp.where(mask, beta_reward * logratio_reward, 0.0)
    utility = jnp.where(mask[..., None], beta_utility * logratio_utility, 0.0)
    weight = jnp.ones((n,), reward.dtype) if weight is None else weight
    ref_utility = None if kl_ref is None else -beta_utility * kl_ref
    return Scores(reward, utility, mask, weight, ref_utility=ref_utility)
