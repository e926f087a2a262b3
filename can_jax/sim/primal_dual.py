"""Iterative primal-dual baselines on the same policy class as one-shot CAN.

(a) `gda`: gradient descent-ascent on the Lagrangian, Safe-RLHF style — policy steps on E_π[r + λᵀg] − β KL,
    and every `delay` steps a projected λ step from the measured constraint slack, λ ← max(0, λ − η(gain − b)).
(b) `cdpo`: C-DPO style outer dual ascent — for each λ iterate, re-align with DPO on labels from r + λᵀg, then
    step λ on the aligned policy's constraint slack.
Both measure constraints exactly in the world (a generous baseline: a real run pays sampling and scoring).
For parametric worlds both take `measure_world`, fresh prompts on which the λ step measures the gains,
and `eval_world`, fresh prompts on which the trace is recorded (log_opt then refers to eval_world); by default
both are the training world.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from can_jax.sim.policy import all_pairs, init_policy, lagrangian, make_pairs, policy_log_probs, train_dpo
from can_jax.sim.worlds import Samples, World, evaluate_policy, kl_between


class Trace(NamedTuple):
    """One row per recorded point: the policy-gradient steps spent so far and the exact state then."""

    steps: jnp.ndarray  # [T] cumulative policy-gradient steps (the compute unit)
    lam: jnp.ndarray  # [T, m]
    violation: jnp.ndarray  # [T] max_j (b_j − gain_j)_+
    reward_gain: jnp.ndarray  # [T]
    kl_to_opt: jnp.ndarray  # [T] KL(π ‖ π*)
    utility_gain: jnp.ndarray | None = None  # [T, m] exact constraint improvements
    kl_ref: jnp.ndarray | None = None  # [T] KL(π ‖ π_ref)


def _record(world, log_opt, beta, kind):
    def rec(params):
        log_pi = policy_log_probs(params, world, kind)
        out = evaluate_policy(world, log_pi, beta)
        return out.violation, out.reward_gain, kl_between(log_pi, log_opt), out.utility_gain, out.kl_ref

    return rec


def _gain(world, beta, kind):
    return lambda params: evaluate_policy(world, policy_log_probs(params, world, kind), beta).utility_gain


@partial(jax.jit, static_argnames=("steps", "delay", "kind"))
def gda(
    world: World,
    beta,
    log_opt: jnp.ndarray,
    steps: int,
    lr_policy: float = 0.05,
    lr_lambda: float = 0.5,
    delay: int = 1,
    kind: str = "tabular",
    key: jax.Array | None = None,
    measure_world: World | None = None,
    eval_world: World | None = None,
) -> Trace:
    """Gradient descent-ascent for `steps` policy steps; λ moves every `delay` steps. log_opt: log π* [P, Y]."""
    params = init_policy(jax.random.key(0) if key is None else key, world, kind)
    m = world.margins.shape[0]
    opt = optax.adam(lr_policy)
    rec = _record(world if eval_world is None else eval_world, log_opt, beta, kind)
    measure = _gain(world if measure_world is None else measure_world, beta, kind)

    def step(carry, t):
        params, state, lam = carry
        grads = jax.grad(lambda p: -lagrangian(p, world, lam, beta, kind))(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        viol, r_gain, kl, gain, kl_ref = rec(params)
        gain_used = gain if measure_world is None and eval_world is None else measure(params)
        lam_new = jnp.maximum(lam - lr_lambda * (gain_used - world.margins), 0.0)
        lam = jnp.where((t + 1) % delay == 0, lam_new, lam)
        return (params, state, lam), (lam, viol, r_gain, kl, gain, kl_ref)

    init = (params, opt.init(params), jnp.zeros((m,), world.reward.dtype))
    _, (lam, viol, r_gain, kl, gain, kl_ref) = jax.lax.scan(step, init, jnp.arange(steps))
    return Trace(jnp.arange(1, steps + 1), lam, viol, r_gain, kl, gain, kl_ref)


def cdpo(
    key: jax.Array,
    world: World,
    samples: Samples | None,
    beta,
    log_opt: jnp.ndarray,
    outer: int,
    inner_steps: int,
    lr_policy: float = 0.05,
    lr_lambda: float = 0.5,
    mode: str = "soft",
    pairs_per_prompt: int = 8,
    kind: str = "tabular",
    warm_start: bool = True,
    measure_world: World | None = None,
    eval_world: World | None = None,
) -> Trace:
    """`outer` rounds of (DPO for `inner_steps` at λ_t, then a λ step); one Trace row per round.

    samples=None labels every response pair of the world (the population regime, see `all_pairs`).
    """
    m = world.margins.shape[0]
    lam = jnp.zeros((m,), world.reward.dtype)
    fresh = init_policy(jax.random.key(0), world, kind)
    params = fresh
    rows = []
    for t, k in enumerate(jax.random.split(key, outer)):
        ev = world if eval_world is None else eval_world
        ms = world if measure_world is None else measure_world
        start = params if warm_start else fresh
        params, lam_next, rec = _cdpo_round(
            start, lam, k, world, samples, ev, ms, log_opt, beta, lr_policy, lr_lambda, inner_steps, mode,
            pairs_per_prompt, kind,
        )  # fmt: skip
        rows.append(((t + 1) * inner_steps, lam, *rec))
        lam = lam_next
    cols = list(zip(*rows))
    return Trace(*(jnp.stack([jnp.asarray(c) for c in col]) for col in cols))


@partial(jax.jit, static_argnames=("steps", "mode", "pairs_per_prompt", "kind"))
def _cdpo_round(params, lam, key, world, samples, eval_world, measure_world, log_opt, beta, lr, lr_lambda, steps,
                mode, pairs_per_prompt, kind):  # fmt: skip
    """One C-DPO round, compiled once per shape (worlds are arguments, not constants)."""
    if samples is None:
        pairs = all_pairs(key, world, lam, mode)
    else:
        pairs = make_pairs(key, samples, lam, mode, pairs_per_prompt)
    params = train_dpo(params, world, pairs, beta, steps, lr, kind)[0]
    viol, r_gain, kl, gain, kl_ref = _record(eval_world, log_opt, beta, kind)(params)
    gain_used = _gain(measure_world, beta, kind)(params)
    lam_next = jnp.maximum(lam - lr_lambda * (gain_used - world.margins), 0.0)
    return params, lam_next, (viol, r_gain, kl, gain, kl_ref)
