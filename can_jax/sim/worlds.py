"""Synthetic constrained-alignment worlds with exact ground truth.

A world has P prompts, each with a finite set of Y responses, a known reference policy π_ref(·|x) = softmax of
logits, a reward and m utilities per response, prompt features and response features. Because everything is
finite, the population dual D(λ), λ*, π* = π_ref·exp((r + λ*ᵀg)/β)/Z and every expectation are exact sums:
`exact_scores` hands the world to the same dual core as offline samples (π_ref as the base weights), and
`sample_scores` draws K responses per prompt from π_ref to produce the offline table a real pipeline produces.

Scores come from latent linear "skills" of the response features, so a small model of (prompt, response)
features can represent π*: helpfulness h = e·v_h + x·W e; utility j = ρ_j h + √(1-ρ_j²) (e·v_j + c_j h_j').
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from can_jax.scores import Scores


class World(NamedTuple):
    """A finite world. Shapes: P prompts, Y responses per prompt, m constraints, F features."""

    prompt_features: jnp.ndarray  # [P, F]
    response_features: jnp.ndarray  # [P, Y, F]
    ref_logits: jnp.ndarray  # [P, Y] π_ref = softmax(ref_logits)
    reward: jnp.ndarray  # [P, Y]
    utility: jnp.ndarray  # [P, Y, m]
    margins: jnp.ndarray  # [m]

    @property
    def log_ref(self) -> jnp.ndarray:
        return jax.nn.log_softmax(self.ref_logits, axis=-1)


def make_world(
    key: jax.Array,
    n_prompts: int,
    n_responses: int,
    m: int,
    n_features: int = 8,
    rho: float = -0.6,
    constraint_corr: float = 0.3,
    heavy_tails: bool = False,
    skew: float = 0.0,
    margin_frac: float = 0.3,
    n_slack: int = 0,
    dtype=None,
) -> World:
    """Draws a world.

    rho: correlation of each utility with helpfulness (negative: helpful answers are riskier).
    constraint_corr: shared component between the utilities (trade-offs between constraints).
    heavy_tails: Student-t (3 d.o.f.) noise in the scores.
    skew: π_ref logits lean *against* helpfulness by this much, making the optimal responses rare under π_ref.
    margin_frac: each margin is this fraction of the constraint's reach (its largest possible improvement);
      the last `n_slack` constraints get a negative margin (loose: λ_j* = 0), so active and slack mix.
    """
    dtype = jnp.result_type(float) if dtype is None else dtype
    ks = jax.random.split(key, 8)
    f = n_features
    x = jax.random.normal(ks[0], (n_prompts, f), dtype)  # [P, F]
    e = jax.random.normal(ks[1], (n_prompts, n_responses, f), dtype)  # [P, Y, F]
    v = jax.random.normal(ks[2], (f, 2 + m), dtype) / jnp.sqrt(f)  # skill directions
    w_int = jax.random.normal(ks[3], (f, f), dtype) / f  # prompt-response interaction
    proj = e @ v  # [P, Y, 2 + m]
    helpful = proj[..., 0] + jnp.einsum("pf,fg,pyg->py", x, w_int, e)
    shared = proj[..., 1]
    if heavy_tails:
        noise = jax.random.t(ks[4], 3.0, (n_prompts, n_responses, m + 1), dtype) * 0.5
    else:
        noise = jax.random.normal(ks[4], (n_prompts, n_responses, m + 1), dtype) * 0.3
    rhos = rho * (1.0 - 0.5 * jnp.arange(m, dtype=dtype) / max(m, 1))  # [m]
    c = constraint_corr
    own = (1 - c) * proj[..., 2:] + c * shared[..., None]
    utility = rhos * helpful[..., None] + jnp.sqrt(1 - rhos**2) * own + noise[..., 1:]  # [P, Y, m]
    reward = 2.0 * helpful + noise[..., 0]
    ref_logits = jax.random.normal(ks[5], (n_prompts, n_responses), dtype) - skew * helpful
    world = World(x, e, ref_logits, reward, utility, jnp.zeros((m,), dtype))
    reach = exact_reach(world)
    margins = margin_frac * reach
    if n_slack:
        margins = margins.at[m - n_slack :].set(-0.5 * reach[m - n_slack :])
    return world._replace(margins=margins)


def exact_scores(world: World) -> Scores:
    """The world as `Scores` with π_ref as base weights: `solve_dual` on it gives the exact population λ*."""
    p, y = world.reward.shape
    return Scores(
        reward=world.reward,
        utility=world.utility,
        mask=jnp.ones((p, y), bool),
        weight=jnp.ones((p,), world.reward.dtype),
        log_prior=world.log_ref,
    )


def exact_reach(world: World) -> jnp.ndarray:
    """[m] the largest improvement of each constraint over π_ref any policy can reach (all mass on the best y)."""
    ref = jnp.exp(world.log_ref)
    return jnp.mean(world.utility.max(axis=1) - jnp.einsum("py,pym->pm", ref, world.utility), axis=0)


def tilted_policy(world: World, lam: jnp.ndarray, beta) -> jnp.ndarray:
    """log π_λ(y|x) = log π_ref + (r + λᵀg)/β − log Z: [P, Y]. At λ* this is the constrained optimum π*."""
    s = (world.reward + world.utility @ lam) / beta
    return jax.nn.log_softmax(world.log_ref + s, axis=-1)


class Outcome(NamedTuple):
    """What a policy achieves in a world, exactly."""

    reward_gain: jnp.ndarray  # E_π[r] − E_ref[r]
    utility_gain: jnp.ndarray  # [m] E_π[g] − E_ref[g]
    violation: jnp.ndarray  # max_j (b_j − utility_gain_j)_+
    kl_ref: jnp.ndarray  # KL(π ‖ π_ref), mean over prompts
    objective: jnp.ndarray  # E_π[r] − β KL(π‖π_ref) − E_ref[r] (the constrained problem's objective)


def evaluate_policy(world: World, log_pi: jnp.ndarray, beta) -> Outcome:
    """Exact outcome of a policy given as log-probabilities [P, Y]."""
    pi, ref = jnp.exp(log_pi), jnp.exp(world.log_ref)
    r_gain = jnp.mean(jnp.sum((pi - ref) * world.reward, axis=1))
    g_gain = jnp.mean(jnp.einsum("py,pym->pm", pi - ref, world.utility), axis=0)
    kl = jnp.mean(jnp.sum(pi * (log_pi - world.log_ref), axis=1))
    violation = jnp.max(jnp.maximum(world.margins - g_gain, 0.0))
    return Outcome(r_gain, g_gain, violation, kl, r_gain - beta * kl)


def kl_between(log_p: jnp.ndarray, log_q: jnp.ndarray) -> jnp.ndarray:
    """Mean over prompts of KL(p ‖ q) for policies given as [P, Y] log-probabilities."""
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))


class Samples(NamedTuple):
    """K responses per prompt drawn from π_ref: their indices into the world's responses and their scores."""

    index: jnp.ndarray  # [P, K] response ids
    scores: Scores  # offline scores of those responses (uniform 1/K weights, as a real pipeline has)


def sample_scores(key: jax.Array, world: World, k: int) -> Samples:
    """Draws K responses per prompt i.i.d. from π_ref (with replacement) and scores them."""
    p = world.reward.shape[0]
    idx = jax.random.categorical(key, world.ref_logits[:, None, :], axis=-1, shape=(p, k))  # [P, K]
    reward = jnp.take_along_axis(world.reward, idx, axis=1)
    utility = jnp.take_along_axis(world.utility, idx[..., None], axis=1)
    # The mask is all True, but derived from the data: a literal constant makes XLA constant-fold reductions over
    # it at compile time (seconds, with a warning) when the solve is vmapped.
    scores = Scores(reward, utility, idx >= 0, jnp.ones((p,), world.reward.dtype))
    return Samples(idx, scores)


class Prealigned(NamedTuple):
    """Exact pre-aligned policies of a world (DESIGN §3): π_θr ∝ π_ref exp(r/β_r), π_θgj ∝ π_ref exp(g_j/β_gj)."""

    logratio_reward: jnp.ndarray  # [P, Y] log π_θr − log π_ref
    logratio_utility: jnp.ndarray  # [P, Y, m]
    kl_ref: jnp.ndarray  # [P, m] KL(π_ref ‖ π_θgj)(x)


def prealigned(world: World, beta_reward, beta_utility) -> Prealigned:
    """The policies DPO would reach with infinite preference data, and their log-ratios to π_ref."""
    log_ref = world.log_ref
    lr = jax.nn.log_softmax(log_ref + world.reward / beta_reward, axis=-1) - log_ref
    beta_utility = jnp.broadcast_to(jnp.asarray(beta_utility), world.margins.shape)
    lg = jax.nn.log_softmax(log_ref[..., None] + world.utility / beta_utility, axis=1) - log_ref[..., None]
    kl = -jnp.einsum("py,pym->pm", jnp.exp(log_ref), lg)  # KL(π_ref‖π_g) = −E_ref[ℓ_g]
    return Prealigned(lr, lg, kl)
