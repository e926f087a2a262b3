"""The one masked log-sum-exp of the project (DESIGN §2 numerics: max shift per prompt)."""

from __future__ import annotations

import jax.numpy as jnp


def masked_log_softmax(s: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Log-sum-exp and softmax over the last axis, ignoring entries where `mask` is False.

    Args:
      s: [..., K] logits. Magnitudes in the hundreds are normal (scores / β with small β).
      mask: [..., K] bool.
    Returns:
      lse: [...] log Σ_k exp(s_k) over masked-in k; -inf where a row has no valid entry.
      w:   [..., K] softmax weights, exactly 0 where mask is False; an all-masked row gets all zeros.
    """
    s_in = jnp.where(mask, s, -jnp.inf)
    top = jnp.max(s_in, axis=-1, keepdims=True)
    # A fully masked row has top = -inf; shifting by 0 there keeps exp() away from inf - inf = NaN.
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(mask, jnp.exp(s - top), 0.0)
    z = jnp.sum(e, axis=-1, keepdims=True)
    safe_z = jnp.where(z > 0, z, 1.0)
    lse = jnp.where(z[..., 0] > 0, top[..., 0] + jnp.log(safe_z[..., 0]), -jnp.inf)
    return lse, e / safe_z
