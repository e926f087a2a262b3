"""λ*(b, β) curves: the solver vmapped over a grid of margin vectors and β values (DESIGN §2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from can_jax.packed import Packed, fast_jit, pack, packable
from can_jax.result import DualResult
from can_jax.scores import Scores
from can_jax.solve import solve_dual


@fast_jit(static_argnames=("max_iter", "block"))
def sweep(
    scores: Scores | Packed,
    margins: jnp.ndarray,
    beta,
    tol=None,
    max_iter: int = 100,
    block="auto",
) -> DualResult:
    """Solves the dual for S (margins, β) pairs in one compiled call (vmapped; on packed CPU scores one after another).

    Args:
      margins: [S, m] margin vectors.  beta: scalar or [S].
    Returns:
      A `DualResult` whose every field has a leading axis S (e.g. `.x` is [S, m], `.status` is [S]).
    """
    dtype = scores.x.dtype if isinstance(scores, Packed) else scores.reward.dtype
    margins = jnp.asarray(margins, dtype)
    s = margins.shape[0]
    betas = jnp.broadcast_to(jnp.asarray(beta, dtype), (s,))

    if not isinstance(scores, Packed) and packable(scores):
        scores = pack(scores, block)  # once for every point

    def one(b, bt):
        return solve_dual(scores, b, bt, tol=tol, max_iter=max_iter, block=block)

    if isinstance(scores, Packed):
        # One point after another: a packed pass is one vectorised reduction per block, which a vmap over the
        # points would turn into a batched one that XLA CPU does not vectorise (and the exact-shift fallback, a
        # branch, into both branches every time).
        return jax.lax.map(lambda a: one(*a), (margins, betas))
    return jax.vmap(one)(margins, betas)


def margin_grid(base: jnp.ndarray, index: int, values: jnp.ndarray) -> jnp.ndarray:
    """[S, m] margins equal to `base` except constraint `index`, which takes each of `values` in turn."""
    values = jnp.asarray(values)
    grid = jnp.broadcast_to(jnp.asarray(base, values.dtype), (values.shape[0],) + jnp.shape(base))
    return grid.at[:, index].set(values)


sweep_jit = sweep  # its earlier name: sweep is compiled itself


def problems_per_step(n: int, k: int, m: int, backend: str | None = None) -> int:
    """Problems vmapped together per step of `solve_many`'s scan: on CPU as many as make ~3 MB of scores (the size
    `dual.auto_block` keeps in cache), at least 1; on GPU/TPU all of them (0 here means all)."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return 0
    return max(1, 393_216 // max(1, n * k * (m + 2)))


@fast_jit(static_argnames=("max_iter", "block", "batch"))
def solve_many(
    scores: Scores, margins, beta, tol=None, max_iter: int = 100, block=None, batch: int | str | None = "auto"
) -> DualResult:
    """Solves P independent problems in one compiled call (many small solves at once).

    Args:
      scores: a `Scores` whose every array has a leading problem axis P ([P, N, K], [P, N, K, m], ...; build it by
        stacking same-shaped problems, padding ragged ones with masked responses and zero-weight prompts).
      margins: [P, m] or [m].  beta: scalar or [P].
      block: prompts per block (static); None (default) keeps each small problem in one block.
      batch: problems vmapped together per step of a scan over the problems (static). "auto"
        (`problems_per_step`): on CPU chunks of ~3 MB of scores, which stay in cache and stop iterating as soon as
        their own problems have converged (a vmap over all P runs every problem until the slowest one ends, over
        arrays far larger than the cache: slower in benchmarks/dual_scale_bench.py); on GPU all P at
        once. None: all P at once.
    Returns:
      A `DualResult` whose every field has a leading axis P.
    """
    p, n, k, m = scores.utility.shape
    dtype = scores.reward.dtype
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (p, m))
    betas = jnp.broadcast_to(jnp.asarray(beta, dtype), (p,))

    def one(args):
        sc, b, bt = args
        return solve_dual(sc, b, bt, tol=tol, max_iter=max_iter, block=block, warm_start=False)

    size = problems_per_step(n, k, m) if batch == "auto" else batch
    if not size or size >= p:
        return jax.vmap(one)((scores, margins, betas))
    return jax.lax.map(one, (scores, margins, betas), batch_size=int(size))


solve_many_jit = solve_many  # its earlier name: solve_many is compiled itself
