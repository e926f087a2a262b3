"""The empirical dual D̂(λ) of DESIGN §2, its gradient and Hessian, in one fused chunked pass over the scores.

    s_ik  = (r_ik + λᵀ g_ik) / β,         w_ik = softmax_k s_ik,      ḡ_i = (1/K_i) Σ_k g_ik
    ℓ_i   = β [logsumexp_k s_ik − log K_i] − λᵀ(ḡ_i + b)              (so D̂ = mean_i ℓ_i, weighted by prompt)
    ∇ℓ_i  = Σ_k w_ik g_ik − ḡ_i − b
    ∇²ℓ_i = (1/β) Cov_{w_i}(g_i)

Writing D̂ as a mean of per-prompt terms (ḡ = mean_i ḡ_i) gives the sandwich covariance and the prompt
bootstrap for free (`weight` reweights prompts). The covariance is computed two-pass inside each prompt, around
its own weighted mean, so it does not cancel catastrophically when utilities carry a large offset.

On CPU a `lax.scan` over blocks of prompts keeps each block in cache and is several times faster than one
einsum over all N·K rows (benchmarks/dual_bench.py measures this); on GPU one big block is best.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from can_jax.errors import InvalidArgumentError
from can_jax.scores import Scores


# The one masked log-sum-exp of the project (DESIGN §2 numerics: max shift per prompt).
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


class DualEval(NamedTuple):
    """One pass of the dual. Fields beyond what `order` asks for are zeros.

    value (scalar), grad [m] (order ≥ 1), hess [m, m] (order 2); reward_gain, kl, ess (scalars, `predict`): the
    predicted outcome of π_λ on the samples (DESIGN §2); reach [m] (`reach`): each constraint's largest
    improvement over π_ref that a policy supported on the samples can make; abs_value (scalar): the mean
    magnitude of the terms summed into `value`, the scale of its rounding error (the solver's Armijo allowance).
    """

    value: jnp.ndarray
    grad: jnp.ndarray
    hess: jnp.ndarray
    reward_gain: jnp.ndarray
    kl: jnp.ndarray
    ess: jnp.ndarray
    reach: jnp.ndarray
    abs_value: jnp.ndarray


class PromptTerms(NamedTuple):
    """Per-prompt pieces at one λ for N prompts."""

    ell: jnp.ndarray  # [N] ℓ_i, 0 for empty prompts
    grad: jnp.ndarray  # [N, m] ∇ℓ_i (zeros when order == 0)
    w: jnp.ndarray  # [N, K] π_λ weights on the samples
    mu: jnp.ndarray  # [N, m] E_{π_λ}[g | x_i]
    valid: jnp.ndarray  # [N] bool, K_i ≥ 1
    lse: jnp.ndarray  # [N] logsumexp_k s_ik (0 for empty prompts)
    k: jnp.ndarray  # [N] K_i as a float, at least 1
    g_ref: jnp.ndarray  # [N, m] ḡ_i = E_ref[g | x_i] on the samples
    log_norm: jnp.ndarray  # [N] log Σ_k base weight (log K_i without a log_prior)
    r_ref: jnp.ndarray  # [N] E_ref[r | x_i] on the samples


def masked(scores: Scores) -> Scores:
    """Zeros every padded entry (mask False) of reward, utility and log_prior.

    `Scores` allows any value in padding; a hand-built one may hold NaN or inf there, and 0·NaN = NaN in every
    masked reduction. Applied inside each pass (XLA fuses it into the pass), so no padding value can leak.
    """
    mask = scores.mask
    lp = scores.log_prior
    return scores._replace(
        reward=jnp.where(mask, scores.reward, 0.0),
        utility=jnp.where(mask[..., None], scores.utility, 0.0),
        log_prior=None if lp is None else jnp.where(mask, lp, 0.0),
    )


def weighted_sum_k(w: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Σ_k w_nk x_nkj: [N, m] from w [N, K] and x [N, K, m], as one [N, K] reduction per j (XLA CPU reduces the
    minor axis of a slice several times faster than the middle axis of [N, K, m], or a batched matvec)."""
    return jnp.stack([(w * x[..., j]).sum(axis=1) for j in range(x.shape[-1])], axis=-1)


def reference_utility(scores: Scores) -> jnp.ndarray:
    """E_ref[g | x_i]: [N, m] — the supplied `ref_utility`, else the mean over the samples (uniform 1/K_i, or
    weighted by `log_prior`). The one definition the dual, its reach and its recession slope share."""
    if scores.ref_utility is not None:
        return scores.ref_utility
    utility = jnp.where(scores.mask[..., None], scores.utility, 0.0)
    if scores.log_prior is None:
        k = jnp.maximum(scores.mask.sum(axis=-1), 1).astype(scores.utility.dtype)
        return weighted_sum_k(jnp.ones_like(scores.reward), utility) / k[:, None]
    _, p = masked_log_softmax(scores.log_prior, scores.mask)
    return weighted_sum_k(p, utility)


def prompt_terms(lam: jnp.ndarray, scores: Scores, margins: jnp.ndarray, beta, order: int = 1) -> PromptTerms:
    """Per-prompt ℓ_i and ∇ℓ_i. lam [m], margins [m], scores of N prompts; `order` (0 or 1) is static."""
    scores = masked(scores)
    reward, utility, mask = scores.reward, scores.utility, scores.mask
    m = utility.shape[-1]
    # λᵀg as a sum of m scaled slices: XLA CPU vectorises this over K far better than a matvec with a tiny
    # contraction axis.
    s = reward + sum(lam[j] * utility[..., j] for j in range(m))  # [N, K]
    k = mask.sum(axis=-1)
    valid = k > 0
    k_safe = jnp.maximum(k, 1).astype(reward.dtype)
    if scores.log_prior is None:
        lse, w = masked_log_softmax(s / beta, mask)
        log_norm = jnp.log(k_safe)  # log Σ_k 1
    else:
        # log Σ_k p_k exp(s_k) with p ∝ exp(log_prior): shift the logits, renormalise by log Σ_k exp(log_prior).
        lse, w = masked_log_softmax(s / beta + scores.log_prior, mask)
        log_norm, p = masked_log_softmax(scores.log_prior, mask)
        log_norm = jnp.where(valid, log_norm, 0.0)
    g_ref = reference_utility(scores)
    ell = beta * (jnp.where(valid, lse, 0.0) - log_norm) - (g_ref + margins) @ lam
    ell = jnp.where(valid, ell, 0.0)
    lse = jnp.where(valid, lse, 0.0)
    r_ref = reward.sum(axis=1) / k_safe if scores.log_prior is None else (p * reward).sum(axis=1)
    if order == 0:
        zeros = jnp.zeros_like(g_ref)
        return PromptTerms(ell, zeros, w, zeros, valid, lse, k_safe, g_ref, log_norm, r_ref)
    mu = weighted_sum_k(w, utility)
    grad = jnp.where(valid[:, None], mu - g_ref - margins, 0.0)
    return PromptTerms(ell, grad, w, mu, valid, lse, k_safe, g_ref, log_norm, r_ref)


def sharded(blocks: Scores) -> bool:
    """Whether blocked scores carry a leading device axis ([D, C/D, B, K, ...], see `device_count` and `place`)."""
    return blocks.reward.ndim == 4


def one_block(blocks: Scores) -> Scores:
    """The first block (for shapes)."""
    return jax.tree.map(lambda x: x[0, 0] if sharded(blocks) else x[0], blocks)


def scan_blocks(step, init, blocks: Scores, combine=None):
    """`lax.scan(step, init, blocks)` over the block axis; over D devices each scans its own blocks (a vmap over the
    device axis, which the partitioner splits) and the D carries are merged by `combine(a, b)` (default: added).
    Returns (carry, stacked ys)."""
    if not sharded(blocks):
        return jax.lax.scan(step, init, blocks)
    carries, ys = jax.vmap(lambda b: jax.lax.scan(step, init, b))(blocks)
    combine = (lambda a, b: jax.tree.map(jnp.add, a, b)) if combine is None else combine
    carry = jax.tree.map(lambda x: x[0], carries)
    for d in range(1, blocks.reward.shape[0]):
        carry = combine(carry, jax.tree.map(lambda x, d=d: x[d], carries))
    return carry, ys


def block_sum(fn, blocks: Scores):
    """Σ_c fn(blocks[c]) for a function returning a PyTree of arrays, scanning over the block axis (and summing
    over devices when the blocks are sharded)."""
    first = jax.eval_shape(fn, one_block(blocks))
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), first)

    def step(carry, block):
        return jax.tree.map(jnp.add, carry, fn(block)), None

    return scan_blocks(step, init, blocks)[0]


def every(blocks: Scores, stride: int) -> Scores:
    """Every `stride`-th block (per device when sharded): a 1/stride subsample of the prompts."""
    if sharded(blocks):
        return jax.tree.map(lambda x: x[:, ::stride], blocks)
    return jax.tree.map(lambda x: x[::stride], blocks)


class Units(NamedTuple):
    """Prompt-weighted sums over the data as given, gathered by a pass with `units=True` (the solver's scale, in
    the same pass as its first evaluation rather than in passes of their own). Divide by `tot` for means.

    tot: Σ wt_i.  spread2 [m]: Σ wt_i E_ref[(g − E_ref[g|x_i])² | x_i].  mag [m]: Σ wt_i max_k |g_ik|.
    r_spread2: Σ wt_i E_ref[(r − E_ref[r|x_i])² | x_i].  r_shift: Σ wt_i c_i, the reward shift the pass removed
    (`shift_block`), by which the value moved.
    """

    tot: jnp.ndarray
    spread2: jnp.ndarray
    mag: jnp.ndarray
    r_spread2: jnp.ndarray
    r_shift: jnp.ndarray


def _slices_max(x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """max_k x_ikj over masked-in k: [B, m] from x [B, K, m] (−inf where a row is empty). One reduction per j: XLA
    CPU reduces a [B, K] slice far faster than the middle axis of [B, K, m]."""
    m = x.shape[-1]
    return jnp.stack([jnp.max(jnp.where(mask, x[..., j], -jnp.inf), axis=1) for j in range(m)], axis=-1)


def shift_block(block: Scores) -> tuple[Scores, jnp.ndarray, jnp.ndarray]:
    """A block with each prompt's scores shifted by those of its first real response (padding zeroed): the large
    per-prompt offsets of real reward models leave the low bits of the pass, as with centring, at the cost of one
    subtraction per score (no reduction first), so every pass can do it on the fly instead of reading a centred copy.
    λ*, ∇D̂, ∇²D̂, reach and predictions do not move; D̂ moves by the shift of the reward. Returns the shifted
    block, the reference weights p [B, K] and the reward shift [B]."""
    sc = masked(block)
    dtype = sc.reward.dtype
    mask = sc.mask
    first = jnp.argmax(mask, axis=1)[:, None]  # [B, 1] the first real response (0 for an empty prompt: all zeros)
    c_r = jnp.take_along_axis(sc.reward, first, axis=1)  # [B, 1]
    c_g = jnp.take_along_axis(sc.utility, first[..., None], axis=1)  # [B, 1, m]
    if sc.log_prior is None:
        p = mask / jnp.maximum(mask.sum(axis=1), 1).astype(dtype)[:, None]  # [B, K]
    else:
        _, p = masked_log_softmax(sc.log_prior, mask)
    r = jnp.where(mask, sc.reward - c_r, 0.0)
    g = jnp.where(mask[..., None], sc.utility - c_g, 0.0)
    ref = None if sc.ref_utility is None else sc.ref_utility - c_g[:, 0, :]
    return sc._replace(reward=r, utility=g, ref_utility=ref), p, c_r[:, 0]


def pass_units(
    lam,
    blocks: Scores,
    margins,
    beta,
    order: int,
    predict: bool = False,
    reach: bool = False,
    centre: bool = False,
    units: bool = False,
    dtype=None,
) -> tuple[DualEval, Units | None]:
    """Weighted means of the prompt terms over [C, B, ...] blocked scores, and the data's `Units` (with `units`).

    `predict` adds the predicted outcome and `reach` the constraints' reach (static flags: each costs ~30% of a
    pass on CPU, so the solver asks for them once, not at every Newton step). `centre` shifts each prompt's scores
    inside the pass (`shift_block`): the same answer on data with large per-prompt offsets, and `value` without the
    prompt-weighted mean of E_ref[r | x_i]. `dtype`: the precision of the pass (blocks stored in another are cast
    block by block).
    """
    m = blocks.utility.shape[-1]
    dtype = blocks.reward.dtype if dtype is None else dtype
    zero, zeros = jnp.zeros((), dtype), jnp.zeros((m,), dtype)

    def block_terms(block: Scores):
        raw = masked(cast(block, dtype))
        if centre:
            block, p, r_shift = shift_block(raw)
        else:
            block = raw
        t = prompt_terms(lam, block, margins, beta, 1 if (order >= 1 or predict) else 0)
        wt = jnp.where(t.valid, block.weight, 0.0)
        out = dict(tot=wt.sum(), value=wt @ t.ell, grad=zeros, hess=jnp.zeros((m, m), dtype))
        out.update(reward_gain=zero, kl=zero, ess=zero, reach=zeros)
        # Magnitude of what `value` sums: its rounding error is ~eps times this (scales with r, g, b and β).
        size = jnp.abs(beta * (t.lse - t.log_norm)) + jnp.abs(t.g_ref @ lam) + jnp.abs(margins @ lam)
        out["abs_value"] = wt @ jnp.where(t.valid, size, 0.0)
        if order >= 1:
            out["grad"] = wt @ t.grad
        if order >= 2:
            # Σ_i wt_i Σ_k w_ik d_ik d_ikᵀ with d centred in-prompt, as one Gram matrix of √(wt w)·d: a single
            # matmul over the block (faster on CPU than a three-operand einsum).
            d = block.utility - t.mu[:, None, :]
            if m == 1:
                out["hess"] = jnp.sum(wt[:, None] * t.w * d[..., 0] ** 2).reshape(1, 1)
            else:
                ds = (jnp.sqrt(wt[:, None] * t.w)[..., None] * d).reshape(-1, m)
                out["hess"] = ds.T @ ds
        if predict:
            # Predicted outcome from the same weights: KL_i = Σ_k w log(K w) = log K + Σ_k w s − lse, with
            # Σ_k w s = (Σ_k w r + λᵀ μ_i)/β, so no extra log per sample is needed.
            wr = (t.w * block.reward).sum(axis=1)
            out["reward_gain"] = wt @ (wr - t.r_ref)
            # With base weights p: KL = Σ_k w (log w − log p) = log_norm + Σ_k w s − lse (s without the prior).
            kl = t.log_norm + (wr + t.mu @ lam) / beta - t.lse
            out["kl"] = wt @ jnp.where(t.valid, kl, 0.0)
            # Σ_k w² ≥ 1/K_i for a real prompt; an empty (padding) prompt has 0 and weight 0: keep it out of the
            # product (0 · inf = NaN), whatever the dtype's smallest number.
            sq = (t.w**2).sum(axis=1)
            out["ess"] = wt @ jnp.where(t.valid, 1.0 / jnp.where(t.valid, sq, 1.0) / t.k, 0.0)
        if reach:
            top = _slices_max(block.utility, block.mask)
            top = jnp.where(t.valid[:, None], top, 0.0)
            out["reach"] = wt @ jnp.where(t.valid[:, None], top - t.g_ref, 0.0)
        if units:
            if not centre:
                raise ValueError("units need centre=True")

            # Spreads around E_ref from the shifted scores (values of the order of the spread: no cancellation).
            def spread(x):
                mean = (p * x).sum(axis=1)
                return jnp.maximum((p * x * x).sum(axis=1) - mean * mean, 0.0), mean

            g2 = jnp.stack([spread(block.utility[..., j])[0] for j in range(m)], axis=-1)
            r2, _ = spread(block.reward)
            mag = _slices_max(jnp.abs(raw.utility), jnp.ones_like(raw.mask))
            out["units"] = Units(out["tot"], wt @ g2, wt @ mag, wt @ r2, wt @ r_shift)
        return out

    acc = block_sum(block_terms, blocks)
    found = acc.pop("units", None)
    tot = acc.pop("tot")
    acc["hess"] = acc["hess"] / beta
    return DualEval(**{k: v / tot for k, v in acc.items()}), found


def cast(scores: Scores, dtype) -> Scores:
    """Scores with every floating array in `dtype` (the mask stays bool)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, scores)


def auto_block(n: int, k: int, m: int, backend: str | None = None) -> int:
    """Prompts per scan step.

    CPU: ~3 MB of scores per block, so a block stays in cache (measured best); a divisor of N near that size is
    preferred, since padding N costs a copy of the whole table on every call. GPU/TPU: blocks of up to 2^26
    values — usually one block, which is what a GPU wants; the cap bounds the temporaries for huge N.
    """
    backend = jax.default_backend() if backend is None else backend
    budget = 393_216 if backend == "cpu" else 1 << 26
    target = int(max(8, min(n, budget // (k * (m + 2)))))
    if target >= n:
        return n
    for b in range(target, max(1, target // 2) - 1, -1):
        if n % b == 0:
            return b
    return target


# Prompts sharded over the local JAX devices: the dual and its bias are sums over prompts, so each device scans its
# own share of the prompt blocks and the sums meet in one all-reduce per pass. Blocked scores are [C, B, ...] on one
# device and [D, C/D, B, ...] over D devices, the leading axis laid out over a one-axis mesh ("prompts") with
# `jax.sharding.NamedSharding`; `scan_blocks` vmaps its scan over that axis and XLA's SPMD partitioner gives each
# device its slice. Multi-host runs go through `jax.distributed.initialize()` before any JAX call (its documented
# set-up): `jax.local_devices()` is then this host's share, and nothing here is home-made about it.
AXIS = "prompts"


def device_count(devices: int | None = 1) -> int:
    """The number of local devices a solve with `devices` uses: None means all of them. The figure to record (the
    certificate's device count)."""
    available = jax.local_device_count()
    if devices is None:
        return available
    devices = int(devices)
    if not 1 <= devices <= available:
        raise InvalidArgumentError(f"devices must be between 1 and the {available} local JAX devices, got {devices}")
    return devices


def place(blocks, devices: int):
    """Lays [D, C/D, B, ...] blocks out with their leading axis over `devices` devices (inside jit: a sharding
    constraint the partitioner follows; outside: a transfer)."""
    if devices <= 1:
        return blocks
    sharding = NamedSharding(Mesh(jax.local_devices()[:devices], (AXIS,)), PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), blocks)


def to_blocks(scores: Scores, block: int | None | str = "auto", devices: int = 1) -> Scores:
    """Reshapes N prompts into [C, B, ...] blocks, padding N with zero-weight prompts.

    block: prompts per block; "auto" picks ~3 MB blocks on CPU and one big block on GPU; None is one block.
    devices: over D > 1 devices the blocks are [D, C/D, B, ...], laid out with the device axis sharded
    (`place`); N is padded to a multiple of D·B.
    """
    n, k, m = scores.utility.shape
    per = -(-n // devices)
    if block == "auto":
        block = auto_block(per, k, m)
    b = per if block is None else min(int(block), per)
    extra = (-n) % (b * devices)  # zero-weight, all-masked prompts (static shapes)
    padded = jax.tree.map(lambda x: jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)), scores) if extra else scores
    if devices <= 1:
        return jax.tree.map(lambda x: x.reshape((-1, b) + x.shape[1:]), padded)
    return place(jax.tree.map(lambda x: x.reshape((devices, -1, b) + x.shape[1:]), padded), devices)


@partial(jax.jit, static_argnames=("order", "block"))
def dual_pass(lam, scores: Scores, margins, beta, order: int = 2, block: int | None | str = "auto") -> DualEval:
    """D̂(λ), ∇D̂(λ) and ∇²D̂(λ) in one fused pass over the data.

    Args:
      lam: [m] multipliers λ ≥ 0.  scores: N prompts.  margins: [m] b.  beta: KL weight β > 0.
      order: 0 value only, 1 value + gradient, 2 value + gradient + Hessian (static under jit).
      block: prompts per scan step (static); "auto" (~3 MB blocks, CPU) or None (one block, GPU).
    """
    return pass_units(lam, to_blocks(scores, block), margins, beta, order)[0]


@partial(jax.jit, static_argnames=("block",))
def dual_value(lam, scores: Scores, margins, beta, block: int | None | str = "auto") -> jnp.ndarray:
    """D̂(λ): scalar. See `dual_pass`."""
    return dual_pass(lam, scores, margins, beta, 0, block).value


@partial(jax.jit, static_argnames=("block",))
def dual_grad(lam, scores: Scores, margins, beta, block: int | None | str = "auto") -> jnp.ndarray:
    """∇D̂(λ): [m], the predicted improvement of π_λ minus the margin."""
    return dual_pass(lam, scores, margins, beta, 1, block).grad


@partial(jax.jit, static_argnames=("block",))
def dual_hessian(lam, scores: Scores, margins, beta, block: int | None | str = "auto") -> jnp.ndarray:
    """∇²D̂(λ): [m, m], (1/(βN)) Σ_i Cov_{w_i}(g_i), positive semi-definite."""
    return dual_pass(lam, scores, margins, beta, 2, block).hess


@jax.jit
def sensitivity(lam: jnp.ndarray, scores, beta) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(p, H) of π_λ on a scores table: its predicted utility gains [m] and their derivative ∂p/∂λ = ∇²D̂(λ)
    [m, m] (one centred pass of the dual; the margins do not enter either)."""
    dtype = scores.reward.dtype
    lam = jnp.asarray(lam, dtype)
    ev, _ = pass_units(lam, to_blocks(scores), jnp.zeros_like(lam), jnp.asarray(beta, dtype), 2, predict=True,
                       centre=True, dtype=dtype)  # fmt: skip
    return ev.grad, ev.hess
