"""Standard errors of λ* (DESIGN §2): the sandwich (delta-method) covariance over prompts, and a prompt
bootstrap that re-solves under multinomial prompt weights with vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from can_jax.dual import block_sum, prompt_terms, to_blocks
from can_jax.scores import Scores
from can_jax.solve import solve_dual


def sandwich_covariance(lam, hess, scores: Scores, margins, beta, block="auto") -> jnp.ndarray:
    """Cov(λ̂*) ≈ H⁻¹ Σ H⁻¹ / N on the active set (λ_j > 0), zero elsewhere. [m, m].

    λ̂* is an M-estimator of mean_i ℓ_i(λ) with per-prompt scores ∇ℓ_i; Σ is their covariance across prompts
    (weighted by prompt weights), H the dual Hessian at λ̂*. A constraint at λ_j = 0 sits on the boundary,
    where the normal approximation does not hold; its rows are zero and `standard_errors` reports NaN.
    """
    m = scores.utility.shape[-1]
    blocks = to_blocks(scores, block)

    def terms(block):
        t = prompt_terms(lam, block, margins, beta, 1)
        wt = jnp.where(t.valid, block.weight, 0.0)
        return wt.sum(), wt @ t.grad, jnp.einsum("n,nj,nl->jl", wt, t.grad, t.grad)

    n, s1, s2 = block_sum(terms, blocks)
    mean = s1 / n
    sigma = s2 / n - jnp.outer(mean, mean)
    free = lam > 0
    both = free[:, None] & free[None, :]
    h = jnp.where(both, hess, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
    h_inv = jnp.where(both, jnp.linalg.inv(h), 0.0)
    del m
    return h_inv @ sigma @ h_inv / n


def standard_errors(result, scores: Scores, margins, beta, block="auto") -> jnp.ndarray:
    """Sandwich standard errors of λ* [m]; NaN for constraints at the boundary λ_j = 0."""
    cov = sandwich_covariance(result.x, result.hess, scores, margins, beta, block)
    return jnp.where(result.x > 0, jnp.sqrt(jnp.maximum(jnp.diag(cov), 0.0)), jnp.nan)


def _solve_with_errors(scores: Scores, margins, beta, tol=None, max_iter: int = 100, block="auto"):
    result = solve_dual(scores, margins, beta, tol=tol, max_iter=max_iter, block=block)
    return result, standard_errors(result, scores, margins, beta, block)


solve_with_errors = jax.jit(_solve_with_errors, static_argnames=("max_iter", "block"))
solve_with_errors.__doc__ = (
    """`solve_dual` and the sandwich `standard_errors` of λ* in one compiled call: (DualResult, [m])."""
)


def bootstrap(key, scores: Scores, margins, beta, n_boot: int = 200, **solve_kwargs) -> jnp.ndarray:
    """λ* re-solved on `n_boot` prompt bootstrap resamples (multinomial prompt weights, vmapped): [n_boot, m].

    Start each from the full-data λ* for speed by passing lam0=… in solve_kwargs.
    """
    n = scores.reward.shape[0]
    base = scores.weight
    real = base > 0

    def one(k):
        idx = jax.random.choice(k, n, (n,), p=real / real.sum())
        counts = jnp.zeros((n,), base.dtype).at[idx].add(1.0)
        return solve_dual(scores._replace(weight=counts), margins, beta, **solve_kwargs).x

    return jax.vmap(one)(jax.random.split(key, n_boot))
