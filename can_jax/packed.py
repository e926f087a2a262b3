"""The dual's pass on CPU: scores packed channel-major, one reduction kernel per block of prompts (DESIGN §2).

`dual.pass_units` over [N, K, m] scores compiles on XLA CPU to some fifty kernels per block, each writing an
intermediate [B, K] array and reading it back: the pass costs many times the read of its input. Here the scores
are packed once per solve into channels [C = m + 1, B, K] (reward first, then the utilities), each prompt shifted
by its first real response as `dual.shift_block` does, and a pass is one variadic reduction over k per block:

    e_ik = exp(s_ik − c_i),   z_i = Σ_k e_ik,   S_ic = Σ_k e_ik y_ikc,   M_ijl = Σ_k e_ik g_ikj g_ikl,   Q_i = Σ_k e_ik²

from which value, gradient, Hessian and the predicted outcome are per-prompt arithmetic on [N] arrays. The shift
c_i needs no max pass: for λ ≥ 0, s_ik = (r_ik + λᵀg_ik)/β ≤ Σ_c coef_c max_k y_ikc with coef = (1, λ)/β, a bound
packed once. Where the bound is so loose that z_i would lose precision (e_ik below √tiny, far from the data's usual
range) the pass is recomputed with the exact row maximum.

XLA vectorises a reduction over the minor axis only when it may reassociate the sum, so the programs that run this
pass compile with `FAST_MATH` (infinities, NaN, division and library functions still IEEE).

Everything that does not depend on λ — the reference means, each constraint's reach, the data's units — is computed
while packing and kept per prompt, so a subsample (`every`) carries its own.
"""

from __future__ import annotations

from functools import partial, wraps
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.dual import DualEval, Units, auto_block
from can_jax.scores import Scores

# For the XLA CPU programs that run a packed pass: reassociation and FMA contraction (IEEE otherwise: infinities,
# NaN, division and library functions honoured), and the widest vectors the CPU has. Other backends ignore them.
FAST_MATH = {
    "xla_cpu_enable_fast_math": True,
    "xla_cpu_fast_math_honor_infs": True,
    "xla_cpu_fast_math_honor_nans": True,
    "xla_cpu_fast_math_honor_division": True,
    "xla_cpu_fast_math_honor_functions": True,
    "xla_cpu_prefer_vector_width": 512,
}


def fast_jit(fun=None, **jit_kwargs):
    """`jax.jit` that compiles with `FAST_MATH` when called at top level; inside another trace (a user's jit or vmap,
    `sweep`) it is an ordinary nested jit, since JAX takes compiler options only at the top, where the outer
    program's own apply. `.plain` is the jit without them. Usable as a decorator, with jit's keywords."""
    if fun is None:
        return lambda f: fast_jit(f, **jit_kwargs)
    plain = jax.jit(fun, **jit_kwargs)
    fast = jax.jit(fun, compiler_options=FAST_MATH, **jit_kwargs)

    @wraps(fun)
    def call(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return plain(*args, **kwargs)
        try:
            return fast(*args, **kwargs)
        except ValueError as err:  # traced inside another jit with only constants for arguments
            if "compiler_options" not in str(err):
                raise
            return plain(*args, **kwargs)

    call.plain = plain
    return call


class Packed(NamedTuple):
    """Scores of N prompts in C blocks of B prompts, channel-major, with the pass's λ-free per-prompt terms.

    x [C, m+1, B, K]: reward then utilities, minus the prompt's first real response, 0 in padding.
    mask [C, B, K]. top [C, m+1, B]: max over real responses of each channel (0 for an empty prompt).
    weight [C, B]: prompt weight, 0 for an empty prompt. count [C, B]: K_i.
    g_ref [C, m, B], r_ref [C, B]: E_ref[g | x_i] and E_ref[r | x_i] of the shifted scores.
    reach [C, m, B]: max_k g_ikj − E_ref[g_j | x_i]. spread2 [C, m, B], r_spread2 [C, B]: within-prompt variances
    under π_ref. mag [C, m, B]: max_k |g_ikj| as given. shift [C, B]: the reward shift removed.
    """

    x: jnp.ndarray
    mask: jnp.ndarray
    top: jnp.ndarray
    weight: jnp.ndarray
    count: jnp.ndarray
    g_ref: jnp.ndarray
    r_ref: jnp.ndarray
    reach: jnp.ndarray
    spread2: jnp.ndarray
    r_spread2: jnp.ndarray
    mag: jnp.ndarray
    shift: jnp.ndarray


def packable(scores: Scores | None, devices: int = 1, backend: str | None = None) -> bool:
    """Whether a solve on these scores (None: a table without `log_prior`) takes the packed pass: on CPU, one device,
    no `log_prior` (GPUs keep the [N, K, m] pass, which is one big fused block there)."""
    backend = jax.default_backend() if backend is None else backend
    return backend == "cpu" and devices == 1 and (scores is None or scores.log_prior is None)


def pack(scores: Scores, block: int | None | str = "auto", dtype=None) -> Packed:
    """Packs N prompts into blocks of `block` prompts ("auto": ~3 MB of scores per block, as `dual.auto_block`;
    None: one block), N padded with empty prompts, in `dtype` (default the scores' own). One pass over the scores."""
    n, k, m = scores.utility.shape
    dtype = scores.reward.dtype if dtype is None else jnp.dtype(dtype)
    b = auto_block(n, k, m) if block == "auto" else (n if block is None else min(int(block), n))
    extra = (-n) % b
    if extra:  # empty, zero-weight prompts (static shapes)
        scores = jax.tree.map(lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)), scores)
    blocks = (n + extra) // b
    mask = scores.mask
    count = jnp.sum(mask, axis=1, dtype=jnp.int32)
    first = jnp.argmax(mask, axis=1)[:, None]  # [N, 1]
    c_r = jnp.where(count > 0, jnp.take_along_axis(scores.reward, first, axis=1)[:, 0], 0.0).astype(dtype)  # [N]
    c_g = jnp.where(count[:, None] > 0, jnp.take_along_axis(scores.utility, first[..., None], axis=1)[:, 0], 0.0)
    c_g = c_g.astype(dtype)  # [N, m]
    # Shifted and masked in the [N, K, m] layout, so that XLA writes x in one transposing kernel.
    r = jnp.where(mask, scores.reward.astype(dtype) - c_r[:, None], 0.0)
    g = jnp.where(mask[..., None], scores.utility.astype(dtype) - c_g[:, None, :], 0.0)
    x = jnp.concatenate([r.reshape(blocks, 1, b, k), g.reshape(blocks, b, k, m).transpose(0, 3, 1, 2)], axis=1)
    shift = jnp.concatenate([c_r[:, None], c_g], axis=1).reshape(blocks, b, m + 1).transpose(0, 2, 1)
    return prepare(x, mask.reshape(blocks, b, k), shift, scores.weight.reshape(blocks, b), scores.ref_utility)


def prepare(x, mask, shift, weight, ref_utility=None) -> Packed:
    """`Packed` from scores already channel-major: x [C, m+1, B, K] shifted by `shift` [C, m+1, B] (each prompt's
    first real response) and 0 in padding, mask [C, B, K], weight [C, B]; ref_utility [N, m] or None (the sample
    mean). The λ-free per-prompt terms are computed here, in one pass over x."""
    return Packed(x=x, mask=mask, **_terms(x, mask, shift, weight, ref_utility))


def _terms(x, mask, shift, weight, ref_utility=None) -> dict:
    """The fields of `Packed` other than x and mask (see `prepare`)."""
    dtype = x.dtype
    blocks, ch, b, _ = x.shape
    m = ch - 1
    zero = jnp.zeros((), dtype)
    ones = jnp.broadcast_to(mask[:, None], x.shape).astype(dtype)  # K_i in the same reduction (fused, not stored)
    s1, s2, k_i = jax.lax.reduce((x, x * x, ones), (zero,) * 3, lambda a, c: tuple(u + v for u, v in zip(a, c)), (3,))
    count = k_i[:, 0]  # [C, B]
    valid = count > 0
    kf = jnp.maximum(count, 1.0)[:, None]
    mean = s1 / kf  # [C, m+1, B]
    var = jnp.maximum(s2 / kf - mean * mean, 0.0)
    # Each prompt's first real response is 0 after the shift and padding is 0, so the maximum and minimum over all
    # K are those over the real responses: plain reductions of x, with no masked copy of it.
    top = jnp.max(x, axis=-1)
    bottom = jnp.min(x, axis=-1)
    mag = jnp.maximum(jnp.abs(top[:, 1:] + shift[:, 1:]), jnp.abs(bottom[:, 1:] + shift[:, 1:]))
    if ref_utility is None:
        g_ref = mean[:, 1:]
    else:
        rows = blocks * b
        ref = jnp.pad(ref_utility, [(0, rows - ref_utility.shape[0]), (0, 0)]).astype(dtype)
        g_ref = jnp.where(valid[:, None], ref.reshape(blocks, b, m).transpose(0, 2, 1) - shift[:, 1:], 0.0)
    return dict(
        top=top,
        weight=jnp.where(valid, weight.astype(dtype), 0.0),
        count=count.astype(dtype),
        g_ref=g_ref,
        r_ref=mean[:, 0],
        reach=jnp.where(valid[:, None], top[:, 1:] - g_ref, 0.0),
        spread2=var[:, 1:],
        r_spread2=var[:, 0],
        mag=mag,
        shift=shift[:, 0],
    )


def every(packed: Packed, stride: int) -> Packed:
    """Every `stride`-th block: a 1/stride subsample of the prompts, with its own λ-free terms."""
    return jax.tree.map(lambda a: a[::stride], packed)


def units(packed: Packed) -> tuple[Units, jnp.ndarray]:
    """The data's `Units` (as a centring `dual.pass_units` gathers them) and each constraint's reach [m]."""
    wt = packed.weight
    tot = wt.sum()

    def wsum(a):  # Σ_i wt_i a_i over [C, (m,) B]
        return jnp.einsum("cb,c...b->...", wt, a)

    reach = wsum(packed.reach) / jnp.where(tot > 0, tot, 1.0)
    return Units(tot, wsum(packed.spread2), wsum(packed.mag), wsum(packed.r_spread2), wsum(packed.shift)), reach


def recession_slope(packed: Packed, lam: jnp.ndarray, margins: jnp.ndarray) -> jnp.ndarray:
    """`certify.recession_slope` on packed scores: mean_i max_k uᵀg_ik − uᵀ(ḡ + b) along u = λ/|λ|₂ (0 at λ = 0)."""
    dtype = packed.x.dtype
    m = packed.g_ref.shape[1]
    norm = jnp.linalg.norm(lam)
    u = jnp.where(norm > 0, lam / jnp.where(norm > 0, norm, 1.0), 0.0).astype(dtype)

    def step(carry, blk):
        xb, mb = blk
        proj = sum(u[j] * xb[j + 1] for j in range(m))  # [B, K]
        return carry, jnp.max(jnp.where(mb, proj, -jnp.inf), axis=1)

    top = jax.lax.scan(step, 0, (packed.x, packed.mask))[1]  # [C, B]
    valid = packed.count > 0
    gap = jnp.where(valid, top - jnp.einsum("j,cjb->cb", u, packed.g_ref), 0.0)
    tot = packed.weight.sum()
    return jnp.sum(packed.weight * gap) / jnp.where(tot > 0, tot, 1.0) - u @ margins


def _block_sums(coef, xb, mb, cb, order: int, exact: bool):
    """One block's per-prompt sums (see the module docstring): [R, B] rows z, S_c (c = 0..m), M_jl (order 2, j ≤ l),
    Q, and the shift c [B]."""
    ch = xb.shape[0]
    s = sum(coef[c] * xb[c] for c in range(ch))  # [B, K]: λᵀg as C scaled streams, no tiny contraction
    shift = jnp.max(jnp.where(mb, s, -jnp.inf), axis=1) if exact else coef @ cb
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    e = jnp.where(mb, jnp.exp(s - shift[:, None]), 0.0)
    first = [e * xb[c] for c in range(ch)]
    ops = [e] + first
    if order >= 2:
        ops += [first[j] * xb[l] for j in range(1, ch) for l in range(j, ch)]
    ops.append(e * e)
    zero = jnp.zeros((), xb.dtype)
    sums = jax.lax.reduce(tuple(ops), (zero,) * len(ops), lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
    return jnp.stack(sums), shift


def _sums(lam, packed: Packed, beta, order: int, exact: bool):
    dtype = packed.x.dtype
    coef = jnp.concatenate([jnp.ones((1,), dtype), lam.astype(dtype)]) / beta

    def step(carry, blk):
        xb, mb, cb = blk
        return carry, _block_sums(coef, xb, mb, cb, order, exact)

    sums, shift = jax.lax.scan(step, 0, (packed.x, packed.mask, packed.top))[1]  # [C, R, B], [C, B]
    return jnp.moveaxis(sums, 1, 0), shift  # [R, C, B]


def _checked_sums(lam, packed: Packed, beta, order: int):
    """`_sums` with the bounded shift, redone with the exact row maximum where the bound is so loose that some z_i
    fell below √tiny (the squares in Q and the products in M would leave the normal range)."""
    floor = jnp.sqrt(jnp.finfo(packed.x.dtype).tiny) * 1e4
    sums, shift = _sums(lam, packed, beta, order, False)
    loose = jnp.any((packed.count > 0) & ~(sums[0] >= floor))
    return jax.lax.cond(loose, lambda: _sums(lam, packed, beta, order, True), lambda: (sums, shift))


def packed_pass(lam, packed: Packed, margins, beta, order: int = 2) -> DualEval:
    """Value, gradient (order ≥ 1), Hessian (order 2) and the predicted outcome of π_λ on packed scores: the
    `DualEval` of `dual.pass_units(..., predict=True, centre=True)` at the same λ. `order` is static. λ ≥ 0."""
    dtype = packed.x.dtype
    m = packed.g_ref.shape[1]
    lam = jnp.asarray(lam, dtype)
    beta = jnp.asarray(beta, dtype)
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    valid = packed.count > 0
    sums, shift = _checked_sums(lam, packed, beta, order)
    wt = packed.weight
    z = jnp.where(valid, sums[0], 1.0)
    log_k = jnp.log(jnp.maximum(packed.count, 1.0))
    lse = shift + jnp.log(z)
    mu = sums[2 : m + 2] / z  # [m, C, B]
    wr = sums[1] / z
    g_ref = jnp.moveaxis(packed.g_ref, 1, 0)  # [m, C, B]
    g_ref_lam = sum(lam[j] * g_ref[j] for j in range(m))
    b_lam = margins @ lam
    kl = log_k + (wr + sum(lam[j] * mu[j] for j in range(m))) / beta - lse
    # Every prompt-weighted sum of the pass in one reduction over the prompts (one kernel, not one per term).
    terms = [
        wt,
        wt * (beta * (lse - log_k) - g_ref_lam - b_lam),
        # (lse = shift + log z rounds at eps·|shift|, which a loose bound makes larger than |lse|)
        wt * (jnp.abs(beta * (lse - log_k)) + jnp.abs(beta * shift) + jnp.abs(g_ref_lam) + jnp.abs(b_lam)),
        wt * (wr - packed.r_ref),
        wt * kl,
        wt * z * z / jnp.where(valid, sums[-1], 1.0) / jnp.maximum(packed.count, 1.0),
    ]
    if order >= 1:
        terms += [wt * (mu[j] - g_ref[j]) for j in range(m)]
    pairs = [(j, l) for j in range(m) for l in range(j, m)]
    if order >= 2:
        q = wt / z
        terms += [q * sums[m + 2 + p] for p in range(len(pairs))]
        terms += [wt * mu[j] * mu[l] for j, l in pairs]
    terms = [jnp.where(valid, t, 0.0) for t in terms]
    zero = jnp.zeros((), dtype)
    tot_, value, size, reward_gain, kl_, ess, *rest = jax.lax.reduce(
        tuple(terms), (zero,) * len(terms), lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1)
    )
    tot = jnp.where(tot_ > 0, tot_, 1.0)
    grad = jnp.zeros((m,), dtype)
    hess = jnp.zeros((m, m), dtype)
    if order >= 1:
        grad = jnp.stack(rest[:m]) / tot - margins
    if order >= 2:
        cross = jnp.stack(rest[m : m + len(pairs)]) - jnp.stack(rest[m + len(pairs) :])
        rows, cols = (jnp.asarray(a) for a in zip(*pairs))
        upper = jnp.zeros((m, m), dtype).at[rows, cols].set(cross)
        hess = (upper + jnp.triu(upper, 1).T) / tot / beta
    return DualEval(
        value=value / tot,
        grad=grad,
        hess=hess,
        reward_gain=reward_gain / tot,
        kl=kl_ / tot,
        ess=ess / tot,
        reach=jnp.zeros((m,), dtype),
        abs_value=size / tot,
    )


def prompt_gradients(lam, packed: Packed, margins, beta) -> jnp.ndarray:
    """Per-prompt ∇ℓ_i = E_{π_λ}[g | x_i] − E_ref[g | x_i] − b: [C, m, B] (0 for an empty prompt), the sandwich's
    scores (`inference.sandwich_covariance`)."""
    dtype = packed.x.dtype
    m = packed.g_ref.shape[1]
    beta = jnp.asarray(beta, dtype)
    margins = jnp.broadcast_to(jnp.asarray(margins, dtype), (m,))
    valid = packed.count > 0
    sums, _ = _checked_sums(jnp.asarray(lam, dtype), packed, beta, 1)
    mu = jnp.moveaxis(sums[2 : m + 2], 0, 1) / jnp.where(valid, sums[0], 1.0)[:, None]  # [C, m, B]
    return jnp.where(valid[:, None], mu - packed.g_ref - margins[None, :, None], 0.0)


def from_grouped(prompt_index, reward, utility, counts=None, ref_utility=None, block: int | str = "auto",
                 dtype=np.float64) -> Packed:  # fmt: skip
    """`Packed` scores straight from a long table's columns (the table reader's path: no [N, K, m] array and no
    transpose; each channel is written into its own contiguous [B, K] slabs).

    prompt_index [R] ids 0..N-1 (rows of one prompt in their order; the first is the prompt's shift), reward [R],
    utility a tuple of m columns [R] (or [R, m]), counts [N] rows per prompt, ref_utility [N, m] or None.
    """
    prompt_index = np.asarray(prompt_index)
    columns = [np.asarray(reward)] + (
        [np.asarray(c) for c in utility]
        if isinstance(utility, (tuple, list))
        else [np.asarray(utility)[:, j] for j in range(np.asarray(utility).shape[1])]
    )
    counts = np.bincount(prompt_index) if counts is None else np.asarray(counts)
    n, ch = counts.shape[0], len(columns)
    k = int(counts.max())
    b = auto_block(n, k, ch - 1, "cpu") if block == "auto" else (n if block is None else min(int(block), n))
    blocks = -(-n // b)
    grouped = bool(np.all(prompt_index[1:] >= prompt_index[:-1]))
    mask = np.zeros((blocks, b, k), bool)
    shift = np.zeros((ch, blocks * b), dtype)
    if grouped and np.all(counts == k):  # equal K, rows grouped by prompt: each channel is a reshape
        # Written channel by channel into one XLA buffer (donated, so updated in place): the table's columns, the
        # packed copy and one column at a time are all the memory it takes.
        x = jnp.zeros((blocks, ch, b, k), dtype)
        for c, col in enumerate(columns):
            shift[c, :n] = col.reshape(n, k)[:, 0]
            x = _put_channel(x, jax.device_put(col), c, n)
        mask.reshape(blocks * b, k)[:n] = True
    else:
        x = np.zeros((blocks, ch, b, k), dtype)
        order = None if grouped else np.argsort(prompt_index, kind="stable")
        idx = prompt_index if order is None else prompt_index[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        slot = np.arange(idx.shape[0]) - starts[idx]
        # Offset of response (i, slot) in channel 0 of the [C, m+1, B, K] array; channel c adds c·B·K.
        base = ((idx // b) * ch * b + idx % b) * k + slot
        flat = x.reshape(-1)
        first_row = starts[counts > 0]
        for c, col in enumerate(columns):
            col = col if order is None else col[order]
            shift[c, :n][counts > 0] = col[first_row]
            flat[base + c * b * k] = col.astype(dtype, copy=False) - shift[c, idx]
        mask.reshape(-1)[((idx // b) * b + idx % b) * k + slot] = True
        # One copy into XLA's buffers: DLPack would hand the NumPy buffer over without it, but a process holding
        # such arrays then aborted at exit now and then ("terminate called without an active exception").
        x = jax.device_put(x)
    weight = np.zeros(blocks * b, dtype)
    weight[:n] = counts > 0
    ref = None if ref_utility is None else jnp.asarray(np.asarray(ref_utility, dtype))
    shift = shift.reshape(ch, blocks, b).transpose(1, 0, 2)
    mask = jax.device_put(mask)
    return Packed(x=x, mask=mask, **_terms_jit(x, mask, np.ascontiguousarray(shift), weight.reshape(blocks, b), ref))


_terms_jit = fast_jit(_terms)


@partial(jax.jit, static_argnums=(2, 3), donate_argnums=(0,))
def _put_channel(x, col, c: int, n: int):
    """x [C, m+1, B, K] with channel c set from a column [n·K] of an equal-K table (each prompt minus its first
    response, in x's dtype: widened before the subtraction)."""
    blocks, _, b, k = x.shape
    v = col.reshape(n, k).astype(x.dtype)
    v = jnp.pad(v - v[:, :1], ((0, blocks * b - n), (0, 0)))
    return x.at[:, c].set(v.reshape(blocks, b, k))
