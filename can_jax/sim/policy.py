"""Policies over a world's finite response sets and their training: DPO on pseudo-preferences (DESIGN §4) and,
as a reference, direct maximisation of the Lagrangian.

A policy is a residual on the reference: log π_θ(y|x) = log π_ref(y|x) + h_θ(x, y) − log Z_θ(x), with h_θ either
a free table [P, Y] ("tabular"), a small flax MLP of the prompt and response features ("mlp"), or log-linear in
the features φ(x, y) = [e, x ⊗ e] ("linear", h_θ = φᵀθ: generalises across prompts, and the DPO loss is convex in
θ). DPO's implicit reward is then exactly β·h_θ, and π* has h* = (r + λ*ᵀg)/β up to a per-prompt
constant — which the "mlp" and "linear" kinds can represent only approximately.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from can_jax.labels import pair_targets
from can_jax.sim.worlds import Samples, World


class MLP(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x, e):  # x [P, F], e [P, Y, F] -> h [P, Y]
        xb = jnp.broadcast_to(x[:, None, :], e.shape)
        z = jnp.concatenate([xb, e, xb * e], axis=-1)
        z = nn.gelu(nn.Dense(self.hidden)(z))
        z = nn.gelu(nn.Dense(self.hidden)(z))
        return nn.Dense(1)(z)[..., 0]


def linear_features(world: World) -> jnp.ndarray:
    """φ(x, y) = [e, x ⊗ e]: [P, Y, F + F²], the features of the "linear" policy kind."""
    x, e = world.prompt_features, world.response_features
    outer = (x[:, None, :, None] * e[:, :, None, :]).reshape(e.shape[:2] + (-1,))
    return jnp.concatenate([e, outer], axis=-1)


def init_policy(key: jax.Array, world: World, kind: str = "tabular", hidden: int = 64):
    """Parameters of a policy that starts at π_ref (zero residual)."""
    if kind == "tabular":
        return {"table": jnp.zeros_like(world.reward)}
    if kind == "linear":
        f = world.prompt_features.shape[-1]
        return {"theta": jnp.zeros((f + f * f,), world.reward.dtype)}
    if kind == "mlp":
        params = MLP(hidden).init(key, world.prompt_features, world.response_features)
        # Zero the last layer so the policy starts exactly at π_ref, like a fresh DPO run.
        last = max(k for k in params["params"] if k.startswith("Dense_"))
        params["params"][last] = jax.tree.map(jnp.zeros_like, params["params"][last])
        return params
    raise ValueError(f"unknown policy kind {kind!r}: use 'tabular', 'mlp' or 'linear'")


def policy_log_probs(params, world: World, kind: str = "tabular", hidden: int = 64) -> jnp.ndarray:
    """log π_θ(y|x): [P, Y]."""
    if kind == "tabular":
        h = params["table"]
    elif kind == "linear":
        h = linear_features(world) @ params["theta"]
    else:
        h = MLP(hidden).apply(params, world.prompt_features, world.response_features)
    return jax.nn.log_softmax(world.log_ref + h, axis=-1)


class Pairs(NamedTuple):
    """Pseudo-preference pairs: response a vs b of prompt `prompt`, with target P(a ≻ b) in [0, 1]."""

    prompt: jnp.ndarray  # [n]
    a: jnp.ndarray  # [n] response ids
    b: jnp.ndarray  # [n]
    target: jnp.ndarray  # [n]


def make_pairs(key: jax.Array, samples: Samples, lam: jnp.ndarray, mode: str, pairs_per_prompt: int = 8) -> Pairs:
    """Random pairs of distinct sampled responses per prompt, labelled from r + λᵀg."""
    idx, sc = samples.index, samples.scores
    p, k = idx.shape
    k1, k2, k3 = jax.random.split(key, 3)
    first = jax.random.randint(k1, (p, pairs_per_prompt), 0, k)
    # A second index ≠ first, uniformly among the other K−1 samples.
    second = (first + jax.random.randint(k2, (p, pairs_per_prompt), 1, k)) % k
    s = sc.reward + sc.utility @ lam  # [P, K]
    s_a, s_b = jnp.take_along_axis(s, first, 1), jnp.take_along_axis(s, second, 1)
    target = pair_targets(k3, s_a, s_b, mode)
    prompt = jnp.broadcast_to(jnp.arange(p)[:, None], first.shape)
    a, b = jnp.take_along_axis(idx, first, 1), jnp.take_along_axis(idx, second, 1)
    return Pairs(prompt.ravel(), a.ravel(), b.ravel(), target.ravel())


def all_pairs(key: jax.Array, world: World, lam: jnp.ndarray, mode: str) -> Pairs:
    """Every pair a < b of every prompt's responses, labelled from r + λᵀg: what infinitely many offline samples
    give (the population regime, where only optimisation is left to compare)."""
    p, y = world.reward.shape
    a, b = jnp.triu_indices(y, 1)
    s = world.reward + world.utility @ lam  # [P, Y]
    target = pair_targets(key, s[:, a], s[:, b], mode)  # [P, Y(Y-1)/2]
    prompt = jnp.broadcast_to(jnp.arange(p)[:, None], target.shape)
    return Pairs(prompt.ravel(), jnp.broadcast_to(a, target.shape).ravel(), jnp.broadcast_to(b, target.shape).ravel(),
                 target.ravel())  # fmt: skip


def dpo_loss(params, world: World, pairs: Pairs, beta, kind: str = "tabular") -> jnp.ndarray:
    """DPO's sigmoid loss with (soft) targets: −E[t log σ(z) + (1−t) log σ(−z)], z = β Δ log(π_θ/π_ref)."""
    ratio = policy_log_probs(params, world, kind) - world.log_ref  # [P, Y]
    z = beta * (ratio[pairs.prompt, pairs.a] - ratio[pairs.prompt, pairs.b])
    return -jnp.mean(pairs.target * jax.nn.log_sigmoid(z) + (1 - pairs.target) * jax.nn.log_sigmoid(-z))


def lagrangian(params, world: World, lam, beta, kind: str = "tabular") -> jnp.ndarray:
    """E_π[r + λᵀg] − β KL(π‖π_ref), exact over the world (to be maximised over θ)."""
    log_pi = policy_log_probs(params, world, kind)
    pi = jnp.exp(log_pi)
    value = jnp.sum(pi * (world.reward + world.utility @ lam), axis=1)
    kl = jnp.sum(pi * (log_pi - world.log_ref), axis=1)
    return jnp.mean(value - beta * kl)


def _fit(loss_fn, params, steps: int, lr: float, record=None):
    """Full-batch Adam for `steps` steps in one scan; returns params and per-step records."""
    opt = optax.adam(lr)

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        rec = loss if record is None else (loss, record(params))
        return (params, state), rec

    (params, _), hist = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params, hist


@partial(jax.jit, static_argnames=("steps", "kind", "record"))
def train_dpo(params, world: World, pairs: Pairs, beta, steps: int, lr: float = 0.05, kind="tabular", record=None):
    """DPO by full-batch Adam. `record(params)` (optional) is traced at every step (e.g. an exact outcome)."""
    return _fit(lambda p: dpo_loss(p, world, pairs, beta, kind), params, steps, lr, record)


@partial(jax.jit, static_argnames=("steps", "kind", "record"))
def train_lagrangian(params, world: World, lam, beta, steps: int, lr: float = 0.05, kind="tabular", record=None):
    """Maximises the exact Lagrangian at fixed λ (the reference policy stage: no preferences involved)."""
    return _fit(lambda p: -lagrangian(p, world, lam, beta, kind), params, steps, lr, record)
