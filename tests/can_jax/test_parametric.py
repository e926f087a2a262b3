"""Issue #15: parametric worlds (prompts drawn from one scoring rule), the log-linear policy that generalises across
prompts, and gains measured from samples. References are NumPy sums and least squares, never the code's output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from can_jax.sim.parametric import draw_world, make_family, measure_gains, set_margins
from can_jax.sim.policy import init_policy, linear_features, make_pairs, policy_log_probs, train_dpo
from can_jax.sim.primal_dual import gda
from can_jax.sim.worlds import evaluate_policy, exact_reach, sample_scores

BETA = 1.0
# One family shape and two world shapes throughout (here and in test_refine), so each jitted function compiles once.
P, Y, P_FRESH = 300, 12, 2000
sample_scores = jax.jit(sample_scores, static_argnums=2)
exact_reach = jax.jit(exact_reach)
evaluate = jax.jit(lambda params, world: evaluate_policy(world, policy_log_probs(params, world, "linear"), BETA))


@pytest.fixture(scope="module")
def family():
    fam = make_family(jax.random.key(0), 2)
    return set_margins(jax.random.key(1), fam, Y, 0.2, n_prompts=P_FRESH)


def _np_features(world):
    x, e = np.asarray(world.prompt_features), np.asarray(world.response_features)
    return np.concatenate([e, np.einsum("pf,pyg->pyfg", x, e).reshape(e.shape[:2] + (-1,))], axis=-1)


def _residual_share(world, lam):
    """Share of the within-prompt variance of r + λᵀg that no log-linear policy in φ = [e, x ⊗ e] can represent
    (NumPy least squares on per-prompt centred scores and features)."""
    s = np.asarray(world.reward) + np.asarray(world.utility) @ lam
    phi = _np_features(world)
    s_c = (s - s.mean(axis=1, keepdims=True)).ravel()
    phi_c = (phi - phi.mean(axis=1, keepdims=True)).reshape(s_c.size, -1)
    coef, *_ = np.linalg.lstsq(phi_c, s_c, rcond=None)
    return np.sum((s_c - phi_c @ coef) ** 2) / np.sum(s_c**2)


def test_linear_part_is_representable_and_the_rest_is_not():
    lam = np.array([1.0, 2.0])
    plain = make_family(jax.random.key(2), 2, nonlinear=0.0, noise=0.0)
    assert _residual_share(draw_world(jax.random.key(3), plain, P, Y), lam) < 1e-20
    rich = make_family(jax.random.key(2), 2, nonlinear=0.3, noise=0.3)
    assert _residual_share(draw_world(jax.random.key(3), rich, P, Y), lam) > 0.05


def test_fresh_prompts_follow_the_same_rule(family):
    a = draw_world(jax.random.key(4), family, P_FRESH, Y)
    b = draw_world(jax.random.key(5), family, P_FRESH, Y)
    assert not np.allclose(a.prompt_features[:5], b.prompt_features[:5])
    # Same rule: the populations of scores agree (means and covariances of the utilities) to sampling error.
    ga, gb = np.asarray(a.utility).reshape(-1, 2), np.asarray(b.utility).reshape(-1, 2)
    np.testing.assert_allclose(np.cov(ga.T), np.cov(gb.T), atol=0.08)
    np.testing.assert_allclose(exact_reach(a), exact_reach(b), atol=0.12)  # ~4 standard errors
    np.testing.assert_array_equal(a.margins, family.margins)


def test_margins_are_a_fraction_of_the_reach_and_slack_ones_negative(family):
    # set_margins measured the reach on the prompts drawn with its own key (margins do not change the scores).
    world = draw_world(jax.random.key(1), family, P_FRESH, Y)
    ref = np.exp(np.asarray(world.log_ref))
    g = np.asarray(world.utility)
    reach = np.mean(g.max(axis=1) - np.einsum("py,pym->pm", ref, g), axis=0)  # NumPy, not exact_reach
    np.testing.assert_allclose(family.margins, 0.2 * reach, rtol=1e-12)
    slack = set_margins(jax.random.key(1), family, Y, 0.2, n_slack=1, n_prompts=P_FRESH)
    np.testing.assert_allclose(slack.margins, [0.2 * reach[0], -0.5 * reach[1]], rtol=1e-12)


def test_linear_policy_and_exact_outcome_on_fresh_prompts_match_numpy_sums(family):
    world = draw_world(jax.random.key(8), family, P, Y)
    theta = jax.random.normal(jax.random.key(9), (8 + 64,)) * 0.2
    params = {"theta": theta}
    np.testing.assert_allclose(linear_features(world), _np_features(world), rtol=1e-14)
    zero = evaluate(init_policy(None, world, "linear"), world)
    assert abs(float(zero.kl_ref)) < 1e-15 and np.abs(np.asarray(zero.utility_gain)).max() < 1e-15  # at π_ref
    out = evaluate(params, world)
    logits = np.asarray(world.ref_logits) + _np_features(world) @ np.asarray(theta)
    pi = np.exp(logits - logits.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    ref = np.exp(np.asarray(world.log_ref))
    g, r = np.asarray(world.utility), np.asarray(world.reward)
    np.testing.assert_allclose(out.utility_gain, np.einsum("py,pym->m", pi - ref, g) / P, rtol=1e-10)
    np.testing.assert_allclose(out.reward_gain, np.sum((pi - ref) * r) / P, rtol=1e-10)
    np.testing.assert_allclose(out.kl_ref, np.sum(pi * (np.log(pi) - np.log(ref))) / P, rtol=1e-9)


def test_one_shot_dpo_generalises_to_fresh_prompts_but_misses_the_prediction(family):
    """DPO at λ on 300 training prompts × 8 samples moves the policy on 2000 fresh prompts, but the class cannot
    realise π_λ: the achieved gains differ from the predicted ones (the self-normalised weights on the samples,
    summed in NumPy — DESIGN §2) by far more than the 0.02 tolerance."""
    train = draw_world(jax.random.key(10), family, P, Y)
    fresh = draw_world(jax.random.key(11), family, P_FRESH, Y)
    smp = sample_scores(jax.random.key(12), train, 8)
    lam = jnp.array([2.0, 1.5])
    pairs = make_pairs(jax.random.key(13), smp, lam, "soft", 16)
    params, _ = jax.jit(lambda p: train_dpo(p, train, pairs, BETA, 200, 0.05, "linear"))(
        init_policy(None, train, "linear")
    )
    out_fresh, out_train = evaluate(params, fresh), evaluate(params, train)
    assert float(out_fresh.kl_ref) > 0.05 and float(out_fresh.reward_gain) > 0.1  # it moved, on unseen prompts
    np.testing.assert_allclose(out_fresh.utility_gain, out_train.utility_gain, atol=0.1)  # and generalised
    np.testing.assert_allclose(out_fresh.kl_ref, out_train.kl_ref, rtol=0.2)
    r, g = np.asarray(smp.scores.reward), np.asarray(smp.scores.utility)
    s = (r + g @ np.asarray(lam)) / BETA
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    predicted = np.einsum("nk,nkm->m", w, g) / P - g.mean(axis=(0, 1))
    miss = np.asarray(out_fresh.utility_gain) - predicted
    assert np.max(np.abs(miss)) > 0.05, miss


def test_measured_gains_cover_the_exact_ones(family):
    world = draw_world(jax.random.key(14), family, P, Y)
    log_pi = jax.nn.log_softmax(world.log_ref + 0.5 * world.utility[..., 0], axis=-1)
    pi, ref, g = np.exp(np.asarray(log_pi)), np.exp(np.asarray(world.log_ref)), np.asarray(world.utility)
    per_prompt = np.einsum("py,pym->pm", pi - ref, g)  # exact gain of each prompt [P, m]
    exact = per_prompt.mean(axis=0)
    keys = jax.random.split(jax.random.key(15), 300)
    ms = jax.vmap(lambda k: measure_gains(k, world, log_pi, 4))(keys)
    gains, se = np.asarray(ms.utility_gain), np.asarray(ms.utility_se)
    # Unbiased for the exact gain on these prompts; with the prompts held fixed the replicates spread only by the
    # within-prompt sampling, while the standard error is for fresh prompts and adds the between-prompt variance.
    assert np.all(np.abs(gains.mean(axis=0) - exact) < 4 * gains.std(axis=0) / np.sqrt(300))
    between = per_prompt.var(axis=0, ddof=1) / P
    np.testing.assert_allclose((se**2).mean(axis=0), gains.var(axis=0) + between, rtol=0.2)
    assert int(ms.n_samples[0]) == P * 4


def test_gda_measuring_on_other_prompts_defaults_to_the_old_behaviour(family):
    world = draw_world(jax.random.key(16), family, P, Y)
    other = draw_world(jax.random.key(17), family, P, Y)
    run = jax.jit(lambda ms, ev: gda(world, BETA, ev.log_ref, 30, kind="linear", measure_world=ms, eval_world=ev))
    base = gda(world, BETA, world.log_ref, 30, kind="linear")
    same = run(world, world)
    np.testing.assert_allclose(base.lam, same.lam, rtol=1e-12)
    np.testing.assert_allclose(base.utility_gain, same.utility_gain, rtol=1e-12)
    moved = run(other, other)  # λ follows the other prompts' gains, and the trace records them
    assert not np.allclose(base.lam, moved.lam)
    assert not np.allclose(base.utility_gain, moved.utility_gain)
    assert np.all(np.isfinite(np.asarray(moved.kl_ref))) and float(moved.kl_ref[-1]) > 0
