"""Pseudo-preference labels from scores s = r + λ*ᵀg (DESIGN §4): the one labelling rule of the project.

JAX is imported inside the function: the torch stages read `MODES` without loading it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax
    import jax.numpy as jnp

MODES = ("bt", "soft", "hard")


def pair_targets(key: jax.Array, s_a: jnp.ndarray, s_b: jnp.ndarray, mode: str) -> jnp.ndarray:
    """Labels for pairs with scores s = r + λ*ᵀg (DESIGN §4): Bradley–Terry P(a ≻ b) = σ(s_a − s_b).

    bt: a sampled 0/1 label; soft: the probability itself; hard: 1 if s_a > s_b (0.5 on exact ties).
    """
    import jax
    import jax.numpy as jnp

    prob = jax.nn.sigmoid(s_a - s_b)
    if mode == "soft":
        return prob
    if mode == "bt":
        return jax.random.bernoulli(key, prob).astype(prob.dtype)
    if mode == "hard":
        return jnp.where(s_a == s_b, 0.5, (s_a > s_b).astype(prob.dtype))
    raise ValueError(f"unknown labelling mode {mode!r}: use one of {MODES}")
