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


def solve_many(scores: Scores, margins, beta, tol=None, max_iter: int = 100, block=None) -> DualResult:
    """Solves P independent problems at once (issue 22: many small solves, vmapped into one compiled call).

    Args:
      scores: a `Scores` whose every array has a leading problem axis P ([P, N, K], [P, N, K, m], ...; build it by
        stacking same-shaped problems, padding ragged ones with masked responses and zero-weight prompts).
      margins: [P, m] or [m].  beta: scalar or [P].
      block: prompts per block (static); None (default) keeps each small problem in one block.
    Returns:
      A `DualResult` whose every field has a leading axis P.
    """
    p, m = scores.reward.shape[0], scores.utility.shape[-1]
    dtype = scores.reward.dtype
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (p, m))
    betas = jnp.broadcast_to(jnp.asarray(beta, dtype), (p,))

    def one(sc, b, bt):
        return solve_dual(sc, b, bt, tol=tol, max_iter=max_iter, block=block, warm_start=False)

    return jax.vmap(one)(scores, margins, betas)


solve_many_jit = jax.jit(solve_many, static_argnames=("max_iter", "block"))
