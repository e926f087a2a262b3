"""Standard errors of λ* (DESIGN §2): the sandwich (delta-method) covariance over prompts, and a prompt
bootstrap that re-solves under multinomial prompt weights with vmap."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.dual import block_sum, cast, device_count, prompt_terms, to_blocks
from can_jax.packed import Packed, fast_jit, pack, packable, prompt_gradients
from can_jax.result import Status
from can_jax.scores import Scores
from can_jax.solve import solve_dual

# The active Hessian counts as singular below this fraction of its largest eigenvalue: λ is then not identified
# (e.g. two proportional utilities), and a sandwich built on its inverse is rounding noise.
SINGULAR = 1e-10


@fast_jit(static_argnames=("block", "devices"))
def sandwich_covariance(lam, hess, scores: Scores, margins, beta, block="auto", devices: int = 1) -> jnp.ndarray:
    """Cov(λ̂*) ≈ H⁻¹ Σ H⁻¹ / N on the active set (λ_j > 0), zero elsewhere. [m, m].

    λ̂* is an M-estimator of mean_i ℓ_i(λ) with per-prompt scores ∇ℓ_i; Σ is their covariance across prompts
    (weighted by prompt weights), H the dual Hessian at λ̂*. A constraint at λ_j = 0 sits on the boundary,
    where the normal approximation does not hold; its rows are zero and `standard_errors` reports NaN. Blocks are
    computed in λ's precision (float32 scores upcast block by block) and sharded over `devices` local devices.
    """
    if isinstance(scores, Packed) or packable(scores, device_count(devices)):
        if isinstance(scores, Packed):  # in λ's precision, as the blocks below
            packed = cast(scores, lam.dtype)
        else:
            packed = pack(scores, block, lam.dtype)
        grad = prompt_gradients(lam, packed, margins, beta)  # [C, m, B]
        wt = packed.weight.astype(lam.dtype)
        n, s1, s2 = wt.sum(), jnp.einsum("cb,cjb->j", wt, grad), jnp.einsum("cb,cjb,clb->jl", wt, grad, grad)
    else:
        blocks = to_blocks(scores, block, device_count(devices))  # devices=None: all of them, as solve_dual

        def terms(block):
            t = prompt_terms(lam, cast(block, lam.dtype), margins, beta, 1)
            wt = jnp.where(t.valid, block.weight, 0.0)
            return wt.sum(), wt @ t.grad, jnp.einsum("n,nj,nl->jl", wt, t.grad, t.grad)

        n, s1, s2 = block_sum(terms, blocks)
    mean = s1 / n
    sigma = s2 / n - jnp.outer(mean, mean)
    free = lam > 0
    both = free[:, None] & free[None, :]
    h = jnp.where(both, hess, 0.0) + jnp.diag(jnp.where(free, 0.0, 1.0))
    h_inv = jnp.where(both, jnp.linalg.inv(h), 0.0)
    return h_inv @ sigma @ h_inv / n


def _n_prompts(scores: Scores | Packed, xp=jnp):
    """Prompts with a positive weight and at least one response."""
    if isinstance(scores, Packed):
        return xp.sum(xp.asarray(scores.weight) > 0)  # 0 already for an empty prompt
    return xp.sum((xp.asarray(scores.weight) > 0) & xp.asarray(scores.mask).any(axis=1))


def _defined(result, scores: Scores | Packed) -> jnp.ndarray:
    """[m] bool: where the sandwich standard error means something (see `standard_error_notes`)."""
    n_prompts = _n_prompts(scores)
    free = result.x > 0
    eig = jnp.linalg.eigvalsh(jnp.where(free[:, None] & free[None, :], result.hess, 0.0))
    singular = ~(result.min_eig > SINGULAR * jnp.maximum(jnp.max(jnp.abs(eig)), jnp.finfo(eig.dtype).tiny))
    ok = (result.status == Status.CONVERGED) & (n_prompts >= 2) & ~singular
    return free & ok


@fast_jit(static_argnames=("block", "devices"))
def standard_errors(result, scores: Scores, margins, beta, block="auto", devices: int = 1) -> jnp.ndarray:
    """Sandwich standard errors of λ* [m]. NaN where undefined: a constraint at the boundary λ_j = 0, a singular
    Hessian on the active set, fewer than two prompts, or an unconverged solve (`standard_error_notes` says which)."""
    cov = sandwich_covariance(result.x, result.hess, scores, margins, beta, block, devices)
    return jnp.where(_defined(result, scores), jnp.sqrt(jnp.maximum(jnp.diag(cov), 0.0)), jnp.nan)


def standard_error_notes(result, scores: Scores, errors=None) -> list[str | None]:
    """Why each standard error is undefined (None where it is defined). Host-side: call outside jit, on one result.
    Given the `errors` `standard_errors` returned, those that are NaN are the undefined ones (no device work)."""
    lam = np.asarray(result.x)
    n_prompts = int(_n_prompts(scores, np))
    defined = np.asarray(_defined(result, scores)) if errors is None else np.isfinite(np.asarray(errors))
    notes: list[str | None] = []
    for j in range(lam.shape[0]):
        if defined[j]:
            notes.append(None)
        elif int(result.status) != Status.CONVERGED:
            notes.append("the solve did not converge")
        elif lam[j] <= 0:
            notes.append("λ = 0 is on the boundary, where the normal approximation does not hold")
        elif n_prompts < 2:
            notes.append(f"{n_prompts} prompt: no spread across prompts to estimate it from")
        else:
            notes.append("the Hessian on the active constraints is singular: λ is not identified")
    return notes


def _solve_with_errors(
    scores: Scores, margins, beta, tol=None, max_iter: int = 100, block="auto", dtype=None, devices: int | None = 1
):
    n_dev = device_count(devices)
    if not isinstance(scores, Packed) and packable(scores, n_dev):
        scores = pack(scores, block, dtype)  # once, for the solve and the sandwich
    result = solve_dual(scores, margins, beta, tol=tol, max_iter=max_iter, block=block, dtype=dtype, devices=n_dev)
    return result, standard_errors(result, scores, margins, beta, block, n_dev)


solve_with_errors = fast_jit(_solve_with_errors, static_argnames=("max_iter", "block", "dtype", "devices"))
solve_with_errors.__doc__ = (
    """`solve_dual` and the sandwich `standard_errors` of λ* in one compiled call: (DualResult, [m])."""
)


class Bootstrap(NamedTuple):
    """Prompt-bootstrap replicates: x [B, m] λ* per replicate (NaN where the solve failed), status [B] (`Status`
    codes), failed (scalar int) the number of replicates that did not converge."""

    x: jnp.ndarray
    status: jnp.ndarray
    failed: jnp.ndarray


def bootstrap(key, scores: Scores, margins, beta, n_boot: int = 200, **solve_kwargs) -> Bootstrap:
    """λ* re-solved on `n_boot` prompt bootstrap resamples (multinomial prompt weights, vmapped).

    Start each from the full-data λ* for speed by passing lam0=… in solve_kwargs. A replicate that does not
    converge (e.g. margins beyond the reach of a resample) keeps its status and gets λ = NaN, never λ₀.
    """
    n = scores.reward.shape[0]
    base = scores.weight
    real = base > 0

    def one(k):
        idx = jax.random.choice(k, n, (n,), p=real / real.sum())
        counts = jnp.zeros((n,), base.dtype).at[idx].add(1.0)
        res = solve_dual(scores._replace(weight=counts), margins, beta, **solve_kwargs)
        return jnp.where(res.status == Status.CONVERGED, res.x, jnp.nan), res.status

    x, status = jax.vmap(one)(jax.random.split(key, n_boot))
    return Bootstrap(x, status, jnp.sum(status != Status.CONVERGED))
