"""λ*(b, β) curves: the solver vmapped over a grid of margin vectors and β values (DESIGN §2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from can_jax.result import DualResult
from can_jax.scores import Scores
from can_jax.solve import solve_dual


def sweep(
    scores: Scores,
    margins: jnp.ndarray,
    beta,
    tol=None,
    max_iter: int = 100,
    block="auto",
) -> DualResult:
    """Solves the dual for S (margins, β) pairs at once.

    Args:
      margins: [S, m] margin vectors.  beta: scalar or [S].
    Returns:
      A `DualResult` whose every field has a leading axis S (e.g. `.x` is [S, m], `.status` is [S]).
    """
    margins = jnp.asarray(margins, scores.reward.dtype)
    s = margins.shape[0]
    betas = jnp.broadcast_to(jnp.asarray(beta, scores.reward.dtype), (s,))

    def one(b, bt):
        return solve_dual(scores, b, bt, tol=tol, max_iter=max_iter, block=block)

    return jax.vmap(one)(margins, betas)


def margin_grid(base: jnp.ndarray, index: int, values: jnp.ndarray) -> jnp.ndarray:
    """[S, m] margins equal to `base` except constraint `index`, which takes each of `values` in turn."""
    values = jnp.asarray(values)
    grid = jnp.broadcast_to(jnp.asarray(base, values.dtype), (values.shape[0],) + jnp.shape(base))
    return grid.at[:, index].set(values)


sweep_jit = jax.jit(sweep, static_argnames=("max_iter", "block"))
