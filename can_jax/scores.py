"""The offline scores container: N prompts × up to K responses × (reward, m utilities), padded and masked.

Ragged K_i are the normal case (DESIGN §2): responses beyond K_i are padding, marked False in `mask`. Prompts
carry a non-negative `weight` (1 for a real prompt, 0 for padding) so that chunking can pad N and a prompt
bootstrap can resample by reweighting, both without changing shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.errors import ScoresFormatError


class Scores(NamedTuple):
    """Scored samples from π_ref. A NamedTuple, hence a PyTree: pass it through jit/vmap/scan freely.

    Attributes:
      reward:  [N, K] reward r_ik (any value where mask is False).
      utility: [N, K, m] utilities g_ik (higher = safer).
      mask:    [N, K] bool, True for a real response.
      weight:  [N] prompt weights (1 = real prompt, 0 = padding; bootstrap multiplicities otherwise).
      log_prior: optional [N, K] log base weights of the responses. None (the offline-samples case): each of the
        K_i samples counts 1/K_i. Given: response k counts p_ik ∝ exp(log_prior_ik) — with log π_ref and every
        response of a finite world, the dual is the exact population dual (DESIGN §2 with E_ref computed).
      ref_utility: optional [N, m] E_ref[g | x_i] supplied from elsewhere (PeCAN's −β_g KL(π_ref‖π_g)(x), a
        lower-variance estimate than the sample mean, DESIGN §3). None: the (weighted) mean over the samples.
    """

    reward: jnp.ndarray
    utility: jnp.ndarray
    mask: jnp.ndarray
    weight: jnp.ndarray
    log_prior: jnp.ndarray | None = None
    ref_utility: jnp.ndarray | None = None

    @property
    def n_prompts(self) -> int:
        return self.reward.shape[0]


def from_padded(reward, utility, mask=None, weight=None, dtype=None, log_prior=None) -> Scores:
    """Builds `Scores` from padded arrays: reward [N, K], utility [N, K, m] (or [N, K] for m = 1).

    `mask` defaults to all True, `weight` to all ones. Entries where mask is False are zeroed so that padding
    never injects NaN into a masked reduction.
    """
    reward = np.asarray(reward)
    utility = np.asarray(utility)
    if utility.ndim == 2:
        utility = utility[..., None]
    if reward.ndim != 2 or utility.ndim != 3 or utility.shape[:2] != reward.shape:
        raise ScoresFormatError(f"expected reward [N, K] and utility [N, K, m]; got {reward.shape} and {utility.shape}")
    mask = np.ones(reward.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != reward.shape:
        raise ScoresFormatError(f"mask shape {mask.shape} does not match reward shape {reward.shape}")
    weight = np.ones(reward.shape[0]) if weight is None else np.asarray(weight, float)
    if dtype is None:
        dtype = jnp.result_type(float)  # float64 when x64 is enabled, else float32
    if not mask.all():
        reward = np.where(mask, reward, 0.0)
        utility = np.where(mask[..., None], utility, 0.0)
    if log_prior is not None:
        log_prior = jnp.asarray(np.where(mask, np.asarray(log_prior), 0.0), dtype)
    return Scores(
        reward=jnp.asarray(reward, dtype),
        utility=jnp.asarray(utility, dtype),
        mask=jnp.asarray(mask),
        weight=jnp.asarray(weight, dtype),
        log_prior=log_prior,
    )


def from_long(prompt_index, reward, utility, dtype=None, max_responses: int | None = None) -> Scores:
    """Builds `Scores` from long format, one row per response (DESIGN §8).

    Args:
      prompt_index: [R] integer prompt ids 0..N-1 (e.g. from `np.unique(..., return_inverse=True)`).
      reward: [R] rewards.  utility: [R, m] (or [R]) utilities.
      max_responses: K; defaults to the largest group size.
    Rows keep their order within each prompt.
    """
    prompt_index = np.asarray(prompt_index)
    reward = np.asarray(reward)
    utility = np.asarray(utility)
    if utility.ndim == 1:
        utility = utility[:, None]
    rows = prompt_index.shape[0]
    if reward.shape != (rows,) or utility.shape[0] != rows:
        raise ScoresFormatError(f"expected {rows} rewards and utilities, got {reward.shape} and {utility.shape}")
    if rows == 0:
        raise ScoresFormatError("the scores table has no rows")
    n = int(prompt_index.max()) + 1
    counts = np.bincount(prompt_index, minlength=n)
    k = int(counts.max()) if max_responses is None else int(max_responses)
    if counts.max() > k:
        raise ScoresFormatError(f"a prompt has {counts.max()} responses, more than K={k}")
    m = utility.shape[1]
    # Scores tables are usually grouped by prompt already: then no sort is needed, and with equal K_i the
    # padded arrays are a reshape.
    grouped = bool(np.all(prompt_index[1:] >= prompt_index[:-1]))
    if grouped and np.all(counts == k):
        return from_padded(reward.reshape(n, k), utility.reshape(n, k, m), dtype=dtype)
    if not grouped:
        order = np.argsort(prompt_index, kind="stable")
        prompt_index, reward, utility = prompt_index[order], reward[order], utility[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = prompt_index * k + (np.arange(rows) - starts[prompt_index])  # [R] position in the padded [N·K]
    r_pad = np.zeros(n * k, reward.dtype)
    g_pad = np.zeros((n * k, m), utility.dtype)
    mask = np.zeros(n * k, bool)
    r_pad[flat] = reward
    g_pad[flat] = utility
    mask[flat] = True
    return from_padded(
        r_pad.reshape(n, k), g_pad.reshape(n, k, m), mask.reshape(n, k), weight=(counts > 0).astype(float), dtype=dtype
    )


def from_grouped(
    prompt_index, reward, utility, max_responses: int | None = None, ref_utility=None, counts=None
) -> Scores:
    """The padded `Scores` of a long table whose columns are already NumPy arrays (the bridge's fast loader).

    Args:
      prompt_index: [R] integer prompt ids 0..N-1 (e.g. a dictionary encoding's indices).
      reward: [R] float32 or float64.  utility: [R, m] (or [R]) of the same kind; a [R, m] array in either memory
        order, or a tuple of m column arrays [R] (no [R, m] stack is made then).
      max_responses: K; defaults to the largest group size.
      ref_utility: optional [N, m] E_ref[g | x_i].  counts: optional [N] rows per prompt (np.bincount of the index).
    Returns:
      `Scores` in the columns' own floating dtype: float32 stays float32 (half the memory) and the solver upcasts
      block by block where it computes in float64 (`solve_dual(..., dtype=jnp.float64)`). Rows keep their order
      within each prompt. No per-row Python: a reshape when rows are grouped by prompt with equal K_i (each array is
      copied once, into the padded layout), else one stable argsort and a scatter.
    """
    prompt_index = np.asarray(prompt_index)
    reward = np.asarray(reward)
    if isinstance(utility, (tuple, list)):
        columns = [np.asarray(c) for c in utility]
    else:
        utility = np.asarray(utility)
        columns = [utility] if utility.ndim == 1 else [utility[:, j] for j in range(utility.shape[1])]
    dtype = np.result_type(reward.dtype, *[c.dtype for c in columns], np.float32)
    rows = prompt_index.shape[0]
    if reward.shape != (rows,) or any(c.shape != (rows,) for c in columns):
        raise ScoresFormatError(
            f"expected {rows} rewards and utilities, got {reward.shape} and {[c.shape for c in columns]}"
        )
    if rows == 0:
        raise ScoresFormatError("the scores table has no rows")
    if counts is None:
        counts = np.bincount(prompt_index)
    n = counts.shape[0]
    k = int(counts.max()) if max_responses is None else int(max_responses)
    if counts.max() > k:
        raise ScoresFormatError(f"a prompt has {counts.max()} responses, more than K={k}")
    m = len(columns)
    grouped = bool(np.all(prompt_index[1:] >= prompt_index[:-1]))
    g_pad = np.empty((n, k, m), dtype)
    if grouped and np.all(counts == k):
        r_pad = reward.astype(dtype, copy=False).reshape(n, k)
        for j, c in enumerate(columns):
            g_pad[..., j] = c.reshape(n, k)
        mask = np.ones((n, k), bool)
    else:
        order = None if grouped else np.argsort(prompt_index, kind="stable")
        idx = prompt_index if order is None else prompt_index[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        flat = idx * k + (np.arange(rows) - starts[idx])  # [R] position in the padded [N·K]
        r_pad = np.zeros(n * k, dtype)
        r_pad[flat] = reward if order is None else reward[order]
        g_flat = g_pad.reshape(n * k, m)
        g_flat[:] = 0.0
        for j, c in enumerate(columns):
            g_flat[flat, j] = c if order is None else c[order]
        mask = np.zeros(n * k, bool)
        mask[flat] = True
        r_pad, mask = r_pad.reshape(n, k), mask.reshape(n, k)
    ref = None if ref_utility is None else jnp.asarray(np.asarray(ref_utility, dtype))
    # device_put: one copy into the device buffer (jnp.asarray makes two: twice the time on a 200 MB table).
    return Scores(
        reward=jax.device_put(r_pad),
        utility=jax.device_put(g_pad),
        mask=jax.device_put(mask),
        weight=jax.device_put((counts > 0).astype(dtype)),
        ref_utility=ref,
    )
