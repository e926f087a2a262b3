"""Parametric worlds: a family of prompts that share one scoring rule, so a policy of (prompt, response) features
trained on some prompts generalises to fresh ones (DESIGN §7).

A `Family` fixes the scoring rule once; `draw_world` draws any number of prompts from it as an ordinary `World`
(exact sums over its Y responses per prompt), so training prompts, calibration prompts and evaluation prompts are
independent draws scored by the same rule. Scores are a linear part in the features φ(x, y) = [e, x ⊗ e] — which
a log-linear policy (`policy` kind "linear") can represent — plus a part no such policy can represent: a quadratic
"nonlinear" term κ((e·u_j)² − |u_j|²) per score and per-response noise. DPO then realises π_λ only approximately, and
the gap between the gains the dual predicts and those the aligned policy achieves on fresh prompts is an exact
number (`evaluate_policy` on a drawn world).

`measure_gains` is what a real correction round can afford: K samples per calibration prompt from the aligned
policy and from π_ref, scored, giving the achieved gains with prompt-level standard errors.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from can_jax.sim.worlds import World, exact_reach


class Family(NamedTuple):
    """The scoring rule shared by every prompt of a parametric world. F features, m constraints."""

    skills: jnp.ndarray  # [F, 2 + m] helpfulness, shared safety and own-safety directions
    interaction: jnp.ndarray  # [F, F] prompt-response interaction of helpfulness
    curvature: jnp.ndarray  # [F, 1 + m] directions u of the quadratic terms (reward, then utilities)
    rho: jnp.ndarray  # [m] correlation of each utility with helpfulness
    constraint_corr: jnp.ndarray  # scalar: weight of the component shared between utilities
    nonlinear: jnp.ndarray  # scalar κ: weight of the quadratic terms
    noise: jnp.ndarray  # scalar: standard deviation of the per-response noise
    skew: jnp.ndarray  # scalar: π_ref leans against helpfulness by this much
    margins: jnp.ndarray  # [m]


@partial(jax.jit, static_argnames=("m", "n_features", "dtype"))
def make_family(
    key: jax.Array,
    m: int,
    n_features: int = 8,
    rho: float = -0.6,
    constraint_corr: float = 0.3,
    nonlinear: float = 0.6,
    noise: float = 0.3,
    skew: float = 0.0,
    dtype=None,
) -> Family:
    """Draws a scoring rule (margins zero; set them with `set_margins`). Arguments as in `worlds.make_world`, plus
    `nonlinear` (κ, the weight of the part of every score outside the log-linear policy class) and `noise`."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    k1, k2, k3 = jax.random.split(key, 3)
    f = n_features
    skills = jax.random.normal(k1, (f, 2 + m), dtype) / jnp.sqrt(f)
    interaction = jax.random.normal(k2, (f, f), dtype) / f
    curvature = jax.random.normal(k3, (f, 1 + m), dtype) / jnp.sqrt(f)
    rhos = rho * (1.0 - 0.5 * jnp.arange(m, dtype=dtype) / max(m, 1))
    c = jnp.asarray
    return Family(skills, interaction, curvature, rhos, c(constraint_corr, dtype), c(nonlinear, dtype),
                  c(noise, dtype), c(skew, dtype), jnp.zeros((m,), dtype))  # fmt: skip


@partial(jax.jit, static_argnames=("n_prompts", "n_responses"))
def draw_world(key: jax.Array, family: Family, n_prompts: int, n_responses: int) -> World:
    """P fresh prompts with Y responses each, scored by the family's rule: a `World` with the family's margins."""
    dtype = family.skills.dtype
    f = family.skills.shape[0]
    m = family.margins.shape[0]
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (n_prompts, f), dtype)  # [P, F]
    e = jax.random.normal(ks[1], (n_prompts, n_responses, f), dtype)  # [P, Y, F]
    proj = e @ family.skills  # [P, Y, 2 + m]
    helpful = proj[..., 0] + jnp.einsum("pf,fg,pyg->py", x, family.interaction, e)
    # (e·u)² − |u|² has mean zero and is orthogonal to every linear function of φ(x, y) under e ~ N(0, I).
    quad = (e @ family.curvature) ** 2 - jnp.sum(family.curvature**2, axis=0)  # [P, Y, 1 + m]
    quad = family.nonlinear * quad
    noise = family.noise * jax.random.normal(ks[2], (n_prompts, n_responses, m + 1), dtype)
    c, rho = family.constraint_corr, family.rho
    own = (1 - c) * proj[..., 2:] + c * proj[..., 1:2]
    utility = rho * helpful[..., None] + jnp.sqrt(1 - rho**2) * own + quad[..., 1:] + noise[..., 1:]  # [P, Y, m]
    reward = 2.0 * helpful + quad[..., 0] + noise[..., 0]  # [P, Y]
    ref_logits = jax.random.normal(ks[3], (n_prompts, n_responses), dtype) - family.skew * helpful
    return World(x, e, ref_logits, reward, utility, family.margins)


@partial(jax.jit, static_argnames=("n_responses", "n_prompts"))
def set_margins(key: jax.Array, family: Family, n_responses: int, margin_frac, n_slack: int = 0,
                n_prompts: int = 4000) -> Family:  # fmt: skip
    """Margins b_j = margin_frac · reach_j (reach measured exactly on n_prompts fresh prompts); the last `n_slack`
    constraints get −0.5 · reach (loose, λ_j* = 0), so active and slack constraints mix."""
    reach = exact_reach(draw_world(key, family, n_prompts, n_responses))
    m = reach.shape[0]
    margins = jnp.broadcast_to(jnp.asarray(margin_frac, reach.dtype), (m,)) * reach
    margins = jnp.where(jnp.arange(m) >= m - n_slack, -0.5 * reach, margins)  # n_slack traced: one compile
    return family._replace(margins=margins)


class Measured(NamedTuple):
    """Achieved gains estimated from samples on calibration prompts, with prompt-level standard errors."""

    utility_gain: jnp.ndarray  # [m]
    utility_se: jnp.ndarray  # [m]
    reward_gain: jnp.ndarray  # scalar
    reward_se: jnp.ndarray  # scalar
    n_samples: jnp.ndarray  # responses drawn and scored from the aligned policy (π_ref's draws not counted)


@partial(jax.jit, static_argnames=("k",))
def measure_gains(key: jax.Array, world: World, log_pi: jnp.ndarray, k: int) -> Measured:
    """K responses per prompt from π (log-probabilities [P, Y]) and K from π_ref, scored; per-prompt differences
    of the sample means give the achieved gains E_π[g] − E_ref[g] and their standard errors over prompts."""
    p = world.reward.shape[0]
    k1, k2 = jax.random.split(key)
    pick_pi = jax.random.categorical(k1, log_pi[:, None, :], axis=-1, shape=(p, k))  # [P, K]
    pick_ref = jax.random.categorical(k2, world.log_ref[:, None, :], axis=-1, shape=(p, k))

    def mean_scores(idx):
        r = jnp.take_along_axis(world.reward, idx, axis=1).mean(axis=1)  # [P]
        g = jnp.take_along_axis(world.utility, idx[..., None], axis=1).mean(axis=1)  # [P, m]
        return r, g

    (r_pi, g_pi), (r_ref, g_ref) = mean_scores(pick_pi), mean_scores(pick_ref)
    dr, dg = r_pi - r_ref, g_pi - g_ref
    sqrt_p = jnp.sqrt(jnp.asarray(p, dr.dtype))
    return Measured(dg.mean(axis=0), dg.std(axis=0, ddof=1) / sqrt_p, dr.mean(), dr.std(ddof=1) / sqrt_p,
                    jnp.asarray(p * k))  # fmt: skip
