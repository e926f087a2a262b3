"""Issue #3: exact worlds, their sampled scores, the policy stage and the primal-dual baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from can_jax.inference import standard_errors
from can_jax.labels import pair_targets
from can_jax.result import Status
from can_jax.sim.policy import Pairs, init_policy, make_pairs, policy_log_probs, train_dpo, train_lagrangian
from can_jax.sim.primal_dual import gda
from can_jax.sim.worlds import (
    evaluate_policy,
    exact_reach,
    exact_scores,
    kl_between,
    make_world,
    sample_scores,
    tilted_policy,
)
from can_jax.solve import solve_dual_jit

BETA = 1.0


@pytest.fixture(scope="module")
def world():
    return make_world(jax.random.key(0), 300, 10, 3, n_slack=1)


@pytest.fixture(scope="module")
def exact(world):
    return solve_dual_jit(exact_scores(world), world.margins, BETA)


def _brute_force_dual(world, lam):
    """D(λ) = β E_x log Σ_y π_ref(y|x) exp((r + λᵀg)/β) − λᵀ(E_ref g + b), summed explicitly in NumPy."""
    ref = np.exp(np.asarray(world.log_ref))
    r, g = np.asarray(world.reward), np.asarray(world.utility)
    s = (r + g @ lam) / BETA
    top = s.max(axis=1, keepdims=True)
    val = BETA * np.mean(top[:, 0] + np.log((ref * np.exp(s - top)).sum(axis=1)))
    g_ref = np.einsum("py,pym->m", ref, g) / len(r)
    return val - lam @ (g_ref + np.asarray(world.margins))


def test_exact_dual_is_the_population_dual_and_pi_star_meets_the_margins(world, exact):
    from can_jax.dual import dual_value

    lam = np.array([0.4, 1.1, 0.3])
    np.testing.assert_allclose(dual_value(jnp.asarray(lam), exact_scores(world), world.margins, BETA),
                               _brute_force_dual(world, lam), rtol=1e-12)  # fmt: skip
    assert exact.status == Status.CONVERGED
    assert exact.x[0] > 0 and exact.x[1] > 0 and exact.x[2] == 0  # two active, one slack
    out = evaluate_policy(world, tilted_policy(world, exact.x, BETA), BETA)
    np.testing.assert_allclose(out.utility_gain[:2], world.margins[:2], atol=1e-8)  # active: exactly met
    assert out.utility_gain[2] > world.margins[2]  # slack: strictly satisfied
    # Strong duality: the optimal objective equals the dual value minus the reference's reward term.
    ref_r = np.mean(np.sum(np.exp(np.asarray(world.log_ref)) * np.asarray(world.reward), axis=1))
    np.testing.assert_allclose(out.objective, float(exact.fun) - ref_r, rtol=1e-9)


def test_sampled_lambda_converges_to_exact_within_standard_errors(world, exact):
    errs = []
    for n_samples in (8, 64):
        smp = sample_scores(jax.random.key(n_samples), world, n_samples)
        est = solve_dual_jit(smp.scores, world.margins, BETA)
        se = np.asarray(standard_errors(est, smp.scores, world.margins, BETA))
        gap = np.abs(np.asarray(est.x) - np.asarray(exact.x))[:2]
        assert np.all(gap < 4 * se[:2] + 1e-3), (gap, se)
        errs.append(gap.max())
    assert errs[1] < errs[0]  # more samples per prompt: closer to the exact λ*


def test_reach_and_sampled_predictions(world):
    reach = np.asarray(exact_reach(world))
    assert np.all(reach > 0)
    assert np.all(np.asarray(world.margins)[:2] < reach[:2])


def test_soft_label_dpo_at_lambda_star_recovers_pi_star():
    """With every pair of a small world labelled softly by σ(s_a − s_b), DPO's optimum is exactly π*."""
    w = make_world(jax.random.key(3), 40, 6, 2)
    lam = solve_dual_jit(exact_scores(w), w.margins, BETA).x
    p, y = w.reward.shape
    a, b = np.triu_indices(y, 1)
    prompt = np.repeat(np.arange(p), len(a))
    a, b = np.tile(a, p), np.tile(b, p)
    s = np.asarray(w.reward + w.utility @ lam)
    pairs = Pairs(jnp.asarray(prompt), jnp.asarray(a), jnp.asarray(b), jax.nn.sigmoid(s[prompt, a] - s[prompt, b]))
    params, _ = jax.jit(lambda q: train_dpo(q, w, pairs, BETA, 3000, 0.05))(init_policy(jax.random.key(0), w))
    log_opt = tilted_policy(w, lam, BETA)
    assert kl_between(policy_log_probs(params, w), log_opt) < 1e-4


def test_lagrangian_maximisation_recovers_pi_star(world, exact):
    params, _ = jax.jit(lambda q: train_lagrangian(q, world, exact.x, BETA, 2000, 0.05))(
        init_policy(jax.random.key(0), world)
    )
    # From KL ≈ 0.85 at π_ref; Adam at lr 0.05 settles within ~3e-6 of π*.
    assert kl_between(policy_log_probs(params, world), tilted_policy(world, exact.x, BETA)) < 1e-5


def test_label_modes():
    s_a, s_b = jnp.array([2.0, 0.0, 1.0]), jnp.array([0.0, 2.0, 1.0])
    np.testing.assert_allclose(pair_targets(None, s_a, s_b, "soft"), jax.nn.sigmoid(s_a - s_b))
    np.testing.assert_array_equal(pair_targets(None, s_a, s_b, "hard"), [1.0, 0.0, 0.5])
    # Bradley–Terry labels: their frequency is σ(Δs) (checked against the closed form over many draws).
    n = 20000
    draws = pair_targets(jax.random.key(0), jnp.full(n, 0.7), jnp.zeros(n), "bt")
    assert abs(float(draws.mean()) - float(jax.nn.sigmoid(0.7))) < 4 * np.sqrt(0.25 / n)
    with pytest.raises(ValueError):
        pair_targets(None, s_a, s_b, "nope")


def test_pairs_are_distinct_sampled_responses(world, exact):
    smp = sample_scores(jax.random.key(5), world, 8)
    pairs = make_pairs(jax.random.key(6), smp, exact.x, "soft", 4)
    assert pairs.prompt.shape == (300 * 4,)
    idx = np.asarray(smp.index)
    for i in range(0, 40):
        p = int(pairs.prompt[i])
        assert int(pairs.a[i]) in idx[p] and int(pairs.b[i]) in idx[p]


def test_primal_dual_with_a_small_step_converges_to_lambda_star(world, exact):
    log_opt = tilted_policy(world, exact.x, BETA)
    trace = jax.jit(lambda: gda(world, BETA, log_opt, 6000, lr_policy=0.05, lr_lambda=0.05))()
    np.testing.assert_allclose(trace.lam[-1], exact.x, atol=0.05)
    assert float(trace.kl_to_opt[-1]) < 1e-3


def test_mlp_policy_starts_at_reference_and_dpo_moves_it_towards_pi_star():
    from can_jax.sim.policy import all_pairs

    w = make_world(jax.random.key(4), 60, 6, 2)
    lam = solve_dual_jit(exact_scores(w), w.margins, BETA).x
    params = init_policy(jax.random.key(0), w, "mlp")
    np.testing.assert_allclose(policy_log_probs(params, w, "mlp"), w.log_ref, atol=1e-12)  # zero residual
    log_opt = tilted_policy(w, lam, BETA)
    start = float(kl_between(w.log_ref, log_opt))
    pairs = all_pairs(None, w, lam, "soft")
    params, losses = jax.jit(lambda q: train_dpo(q, w, pairs, BETA, 400, 0.01, "mlp"))(params)
    assert float(losses[-1]) < float(losses[0])
    assert float(kl_between(policy_log_probs(params, w, "mlp"), log_opt)) < 0.5 * start
