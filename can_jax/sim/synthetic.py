"""Synthetic multi-constraint scores for benchmarks, the demo and tests.

Each response has a latent helpfulness h; the reward follows h, and each utility trades off against it with
its own correlation ρ_j < 0 (helpful answers are riskier), plus a per-prompt offset on every score (as real
reward models have; it must not move λ*, DESIGN §2). Scores sit in the 10-30 range of real reward models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from can_jax.scores import Scores


def synthetic_scores(
    key: jax.Array,
    n: int,
    k: int,
    m: int,
    rho: float = -0.5,
    ragged: bool = False,
    dtype=None,
) -> Scores:
    """N prompts × K responses × m utilities. With `ragged`, K_i is uniform on {2..K}.

    rho: correlation of each utility with the reward (constraint j uses rho·(1 - j/(2m)), so they differ).
    """
    dtype = jnp.result_type(float) if dtype is None else dtype
    kh, ke, ko, kr, kk = jax.random.split(key, 5)
    h = jax.random.normal(kh, (n, k), dtype)  # [N, K] latent helpfulness
    noise = jax.random.normal(ke, (n, k, m), dtype)  # [N, K, m]
    offsets = jax.random.normal(ko, (n, 1 + m), dtype)  # per-prompt constants
    rhos = rho * (1.0 - jnp.arange(m, dtype=dtype) / (2 * m))  # [m]
    reward = 20.0 + 3.0 * h + 0.5 * jax.random.normal(kr, (n, k), dtype) + 4.0 * offsets[:, :1]
    utility = rhos * h[..., None] + jnp.sqrt(1.0 - rhos**2) * noise + offsets[:, None, 1:]
    if ragged:
        counts = jax.random.randint(kk, (n,), 2, k + 1)
        mask = jnp.arange(k)[None, :] < counts[:, None]
    else:
        mask = jnp.ones((n, k), bool)
    reward = jnp.where(mask, reward, 0.0)
    utility = jnp.where(mask[..., None], utility, 0.0)
    return Scores(reward, utility, mask, jnp.ones((n,), dtype))
