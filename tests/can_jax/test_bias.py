"""The finite-K jackknife (can_jax/bias.py) against brute-force leave-one-out in NumPy, scipy's root of the
jackknifed equation, the sandwich of can_jax.inference, and an exact world where the truth is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import root
from scipy.special import logsumexp, softmax

from can_jax.bias import finite_k_bias, finite_k_bias_jit, interval
from can_jax.errors import InvalidArgumentError
from can_jax.inference import standard_errors
from can_jax.solve import solve_dual, solve_dual_jit
from tests.can_jax.bias_reference import bias_ratio, leave_one_out_mean, outcome_terms
from tests.conftest import groups_to_scores, make_groups

BETA = 0.7
STEPS = 6  # Newton steps on the jackknifed equation: converged, for the comparison with scipy's root


def corrected(lam, scores, b):
    """Every test shares this one compiled call (and the fixture's shapes) to keep compile time down."""
    return finite_k_bias_jit(lam, scores, jnp.asarray(b), BETA, steps=STEPS)


def ref_theta(lam, r, g, b, beta):
    """[m + 2]: ψ = E_w[g] − ḡ − b, reward gain, KL = Σ w log(K w) for one prompt, from the formulas."""
    s = (r + g @ lam) / beta
    w = softmax(s)
    kl = float(np.sum(w * (np.log(len(r)) + s - logsumexp(s))))
    return np.concatenate([w @ g - g.mean(axis=0) - b, [w @ r - r.mean(), kl]])


def ref_pseudo(lam, groups, b, beta):
    """Plain θ_i and jackknife pseudo-values K θ_i − (K − 1) mean_k θ_i^(−k), deleting each response in turn."""
    plain, jack = [], []
    for r, g in groups:
        t = ref_theta(lam, r, g, b, beta)
        k = len(r)
        if k < 2:
            plain.append(t)
            jack.append(t)
            continue
        loo = np.mean([ref_theta(lam, np.delete(r, i), np.delete(g, i, axis=0), b, beta) for i in range(k)], axis=0)
        plain.append(t)
        jack.append(k * t - (k - 1) * loo)
    return np.array(plain), np.array(jack)


@pytest.fixture(scope="module")
def problem():
    groups = make_groups(5, 40, 7, 2, k_min=1)  # ragged, with some one-response prompts; offset 20
    scores = groups_to_scores(groups)
    b = np.array([0.3, 0.2])
    res = solve_dual_jit(scores, jnp.asarray(b), BETA)
    assert int(res.status) == 0 and np.all(np.asarray(res.x) > 0)
    rep = corrected(res.x, scores, b)
    return groups, scores, b, res, rep


def test_leave_one_out_means_match_brute_force(problem):
    groups, scores, b, _, _ = problem
    lam = np.array([0.8, 1.9])
    got = np.asarray(leave_one_out_mean(jnp.asarray(lam), scores, jnp.asarray(b), BETA))
    for i, (r, g) in enumerate(groups):
        t = ref_theta(lam, r, g, b, BETA)
        if len(r) < 2:
            want = t
        else:
            want = np.mean([ref_theta(lam, np.delete(r, k), np.delete(g, k, 0), b, BETA) for k in range(len(r))], 0)
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-11)


def test_leave_one_out_survives_one_dominant_response():
    """Small β: one response carries all the weight (w → 1), where Σ_l e_l q_l − e_k q_k would cancel to 0/0."""
    r = np.array([[50.0, 0.0, -1.0, 3.0], [2.0, 2.0, 1.0, 0.0]])
    g = np.array([[[1.0], [0.5], [2.0], [-1.0]], [[0.0], [1.0], [2.0], [3.0]]])
    groups = [(r[i], g[i]) for i in range(2)]
    scores = groups_to_scores(groups)
    lam, b, beta = np.array([0.4]), np.array([0.1]), 0.01
    got = np.asarray(leave_one_out_mean(jnp.asarray(lam), scores, jnp.asarray(b), beta))
    assert np.all(np.isfinite(got))
    for i, (ri, gi) in enumerate(groups):
        want = np.mean([ref_theta(lam, np.delete(ri, k), np.delete(gi, k, 0), b, beta) for k in range(4)], 0)
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-9)


def test_plain_estimates_are_the_solver_s(problem):
    _, scores, b, res, rep = problem
    np.testing.assert_array_equal(rep.lam.plain, res.x)
    np.testing.assert_allclose(rep.utility_gain.plain, res.predicted.utility_gain, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rep.reward_gain.plain, res.predicted.reward_gain, rtol=1e-10)
    np.testing.assert_allclose(rep.kl.plain, res.predicted.kl, rtol=1e-10)
    np.testing.assert_allclose(rep.lam.se_plain, standard_errors(res, scores, jnp.asarray(b), BETA), rtol=1e-8)
    theta, _ = outcome_terms(res.x, scores, jnp.asarray(b), BETA)
    np.testing.assert_allclose(np.asarray(theta).mean(0)[:2], res.jac, atol=1e-10)


def test_corrected_estimates_match_scipy_root_of_the_jackknifed_equation(problem):
    groups, _, b, res, rep = problem
    lam_hat = np.asarray(res.x)
    plain, jack = ref_pseudo(lam_hat, groups, b, BETA)
    # The predicted outcome of π_λ̂ is corrected at λ̂: mean of the pseudo-values; bias = plain − corrected.
    np.testing.assert_allclose(rep.utility_gain.corrected, jack.mean(0)[:2] + b, rtol=1e-9)
    np.testing.assert_allclose(rep.reward_gain.bias, plain.mean(0)[2] - jack.mean(0)[2], rtol=1e-8)
    np.testing.assert_allclose(rep.kl.corrected, jack.mean(0)[3], rtol=1e-9)
    se = jack.std(0) / np.sqrt(len(groups))
    np.testing.assert_allclose(rep.kl.se, se[3], rtol=1e-8)
    np.testing.assert_allclose(rep.utility_gain.se, se[:2], rtol=1e-8)
    np.testing.assert_allclose(rep.utility_gain.se_plain, plain.std(0)[:2] / np.sqrt(len(groups)), rtol=1e-8)

    def eq(lam):
        return ref_pseudo(lam, groups, b, BETA)[1].mean(0)[:2]

    sol = root(eq, lam_hat, tol=1e-13)
    assert sol.success
    np.testing.assert_allclose(rep.lam.corrected, sol.x, rtol=1e-8)
    np.testing.assert_allclose(rep.lam.bias, lam_hat - sol.x, rtol=1e-6, atol=1e-10)
    # The corrected λ's sandwich: bread = the jackknifed equation's Jacobian (finite differences here), meat =
    # the pseudo-values' covariance at λ̂.
    h = 1e-6
    jac = np.array([(eq(sol.x + h * e) - eq(sol.x - h * e)) / (2 * h) for e in np.eye(2)]).T
    cov = np.cov(jack[:, :2].T, bias=True) / len(groups)
    j_inv = np.linalg.inv(0.5 * (jac + jac.T))
    np.testing.assert_allclose(rep.lam.se, np.sqrt(np.diag(j_inv @ cov @ j_inv.T)), rtol=1e-4)


def test_intervals_and_ratio(problem):
    *_, rep = problem
    lo, hi = interval(rep.kl)
    np.testing.assert_allclose((lo + hi) / 2, rep.kl.corrected)
    np.testing.assert_allclose(hi - lo, 2 * 1.959963984540054 * rep.kl.se)
    lo, hi = interval(rep.lam, corrected=False)
    np.testing.assert_allclose((lo + hi) / 2, rep.lam.plain)
    np.testing.assert_allclose(bias_ratio(rep.kl), abs(rep.kl.bias) / rep.kl.se_plain)
    assert int(rep.prompts) == 40
    assert int(rep.prompts_corrected) == sum(len(r) >= 2 for r, _ in make_groups(5, 40, 7, 2, k_min=1))


def test_padding_and_offsets_do_not_change_the_answer(problem):
    groups, _, b, res, rep = problem
    shifted = groups_to_scores([(r + 1e3, g - 50.0) for r, g in groups])  # per-prompt constants move nothing
    wide = groups_to_scores(groups, k=12)  # more padding per prompt
    for other in (corrected(res.x, shifted, b), finite_k_bias(res.x, wide, jnp.asarray(b), BETA, steps=STEPS)):
        for a, c in zip(jax.tree.leaves(rep), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, c, rtol=1e-7, atol=1e-9)


def test_inactive_constraint_stays_at_zero_with_undefined_standard_error(problem):
    groups, scores, *_ = problem
    b = jnp.asarray([0.3, -5.0])  # the second is slack: λ_2 = 0
    res = solve_dual_jit(scores, b, BETA)
    rep = corrected(res.x, scores, b)
    assert float(res.x[1]) == 0.0 and float(rep.lam.corrected[1]) == 0.0
    assert np.isnan(rep.lam.se[1]) and np.isnan(rep.lam.se_plain[1])
    assert np.isfinite(rep.lam.se[0])


def test_weighted_samples_are_refused(problem):
    _, scores, b, res, _ = problem
    with pytest.raises(InvalidArgumentError, match="log_prior"):
        finite_k_bias(res.x, scores._replace(log_prior=jnp.zeros_like(scores.reward)), b, BETA)


def test_exact_world_the_correction_moves_towards_the_truth():
    """In an exact world (λ*, and the exact outcome of π_λ̂, known) the jackknife removes most of the finite-K
    bias: averaged over 16 samples of N = 300 prompts × K = 8, the corrected λ and predictions sit closer to the
    truth than the plain ones (the plain bias is several standard errors of that average)."""
    from can_jax.sim.worlds import evaluate_policy, exact_scores, make_world, sample_scores, tilted_policy

    world = make_world(jax.random.key(3), 300, 8, 2)
    lam_star = solve_dual(exact_scores(world), world.margins, 1.0).x

    def one(key):
        smp = sample_scores(key, world, 8)
        res = solve_dual(smp.scores, world.margins, 1.0)
        rep = finite_k_bias(res.x, smp.scores, world.margins, 1.0)
        out = evaluate_policy(world, tilted_policy(world, res.x, 1.0), 1.0)
        return rep, out

    rep, out = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(4), 16))
    err_plain = np.abs(np.mean(rep.lam.plain, 0) - lam_star)
    err_corr = np.abs(np.mean(rep.lam.corrected, 0) - lam_star)
    assert np.all(err_corr < 0.4 * err_plain)
    # (The reward gain's sampling spread, ~0.1 per sample here, is too wide for 16 samples to show its bias.)
    for c, exact in ((rep.kl, out.kl_ref), (rep.utility_gain, out.utility_gain)):
        gap_plain = np.abs(np.mean(np.asarray(c.plain) - np.asarray(exact), 0))
        gap_corr = np.abs(np.mean(np.asarray(c.corrected) - np.asarray(exact), 0))
        assert np.all(gap_corr < 0.5 * gap_plain)
