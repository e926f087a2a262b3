"""Issue #15 / DESIGN §7: the correction round. References: scipy's NNLS for the box-constrained step, affine
"achieved" maps whose root is known in closed form, and NumPy brute-force sums over a finite world."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq, nnls

from can_jax.refine import box_qp, caid_step, newton_step, on_target, refine_init, refine_step, secant_update
from can_jax.sim.policy import init_policy, make_pairs, policy_log_probs, train_dpo
from can_jax.sim.worlds import make_world, sample_scores

BETA = 1.0
newton_jit = jax.jit(newton_step)
refine_jit = jax.jit(refine_step, static_argnames=("secant", "self_scale"))


def _spd(rng, m, cond=50.0):
    q, _ = np.linalg.qr(rng.normal(size=(m, m)))
    return q @ np.diag(np.geomspace(1.0, 1.0 / cond, m)) @ q.T


def _nnls_reference(jac, grad0, lam0):
    """argmin_{λ≥0} ½‖Lᵀλ + L⁻¹c‖² with J = LLᵀ, c = grad0 − J λ0: the same problem as an NNLS (scipy)."""
    chol = np.linalg.cholesky(jac)
    c = grad0 - jac @ lam0
    x, _ = nnls(chol.T, -np.linalg.solve(chol, c), maxiter=1000)
    return x


@pytest.mark.parametrize("m", [1, 3, 8])
def test_box_qp_matches_nnls(m):
    rng = np.random.default_rng(m)
    for _ in range(5):
        jac = _spd(rng, m)
        lam0 = np.maximum(rng.normal(size=m), 0.0)
        grad0 = rng.normal(size=m)
        got = np.asarray(jax.jit(box_qp)(jnp.asarray(jac), jnp.asarray(grad0), jnp.asarray(lam0)))
        want = _nnls_reference(jac, grad0, lam0)
        np.testing.assert_allclose(got, want, atol=1e-9)
        assert np.all(got >= 0)


def _affine(a0, lam0, mat):
    return lambda lam: a0 + mat @ (lam - lam0)


def test_newton_step_lands_on_the_margins_when_achieved_is_affine_and_j_is_its_slope():
    """a(λ) = a0 + M(λ − λ0): one step with J = M meets every active margin exactly and leaves λ ≥ 0; a constraint
    already over its margin with a small λ is projected to λ = 0 and stays satisfied (KKT of the linear model)."""
    rng = np.random.default_rng(0)
    m = 4
    mat = _spd(rng, m, cond=10.0)
    lam0 = np.array([1.0, 2.0, 0.5, 0.05])
    a0 = np.array([0.2, 0.3, 0.1, 0.9])
    margins = np.array([0.5, 0.4, 0.3, 0.2])  # the last constraint is far over its margin
    achieved = _affine(a0, lam0, mat)
    lam1 = np.asarray(newton_jit(*map(jnp.asarray, (lam0, a0, margins, mat))))
    a1 = achieved(lam1)
    assert np.all(lam1 >= 0)
    assert lam1[3] == 0 and a1[3] >= margins[3] - 1e-12  # projected: slack, satisfied
    np.testing.assert_allclose(a1[lam1 > 0], margins[lam1 > 0], atol=1e-10)  # active: exactly on b
    # The unprojected step would have driven λ_4 negative: the projection is doing work here.
    assert (lam0 + np.linalg.solve(mat, margins - a0))[3] < 0


def test_secant_round_lands_when_the_policy_realises_a_fixed_fraction_of_the_predicted_move():
    """a(λ) = c·p(λ) + d with p affine of slope H (the dual's Hessian): round 1 (J = H) misses by (1 − c), round 2
    (self-scaling secant) has J = cH and lands on b."""
    rng = np.random.default_rng(1)
    m, c = 3, 0.4
    hess = _spd(rng, m, cond=8.0)
    lam_star = np.array([1.0, 0.8, 1.5])
    d = rng.normal(size=m) * 0.1
    margins = np.array([0.6, 0.5, 0.7])
    achieved = _affine(c * margins + d, lam_star, c * hess)  # p(λ*) = b: the one-shot prediction is on target

    def run(self_scale: bool):
        st = refine_init(jnp.asarray(lam_star), jnp.asarray(hess))
        gaps = [achieved(lam_star) - margins]
        for _ in range(2):
            st = refine_jit(st, jnp.asarray(achieved(np.asarray(st.lam))), jnp.asarray(margins), True, self_scale)
            gaps.append(achieved(np.asarray(st.lam)) - margins)
        return np.array(gaps), st

    gaps, st = run(True)
    np.testing.assert_allclose(gaps[1], (1 - c) * gaps[0], atol=1e-10)  # Newton with H: a (1 − c) miss left
    np.testing.assert_allclose(gaps[2], 0.0, atol=1e-10)
    np.testing.assert_allclose(st.jac, c * hess, atol=1e-10)
    # Plain BFGS lands too here (the residual stays along the first step), but learns c only along that step.
    plain, st_plain = run(False)
    np.testing.assert_allclose(plain[2], 0.0, atol=1e-10)
    assert np.abs(np.asarray(st_plain.jac) - c * hess).max() > 1e-2


def test_secant_update_meets_the_secant_condition_and_stays_positive_definite():
    rng = np.random.default_rng(2)
    for _ in range(10):
        jac = _spd(rng, 5)
        s = rng.normal(size=5)
        y = _spd(rng, 5) @ s  # positive curvature sᵀy > 0
        new = np.asarray(secant_update(jnp.asarray(jac), jnp.asarray(s), jnp.asarray(y)))
        np.testing.assert_allclose(new @ s, y, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(new, new.T, atol=1e-12)
        assert np.linalg.eigvalsh(new)[0] > 0
    # Noise that flips the curvature sign: damped, still positive definite; no move: unchanged.
    jac = _spd(rng, 3)
    new = np.asarray(secant_update(jnp.asarray(jac), jnp.ones(3), -jnp.ones(3)))
    assert np.linalg.eigvalsh(new)[0] > 0
    np.testing.assert_array_equal(secant_update(jnp.asarray(jac), jnp.zeros(3), jnp.ones(3)), jac)


def test_caid_step_and_target_rule():
    lam = jnp.array([1.0, 0.1])
    np.testing.assert_allclose(caid_step(lam, jnp.array([0.4, 0.9]), jnp.array([0.5, 0.5]), 2.0), [1.2, 0.0])
    b = jnp.array([0.5, 0.5, 0.5])
    active = jnp.array([True, True, False])
    assert on_target(jnp.array([0.51, 0.485, 0.9]), b, active)
    assert not on_target(jnp.array([0.53, 0.5, 0.9]), b, active)  # active and 0.03 over: off target
    assert on_target(jnp.array([0.53, 0.5, 0.9]), b, active, interval=jnp.array([0.04, 0.0, 0.0]))
    assert not on_target(jnp.array([0.5, 0.5, 0.45]), b, active)  # slack but violated


def _np_tilt(world, lam):
    """π_λ over a finite world's responses and the utility g_1, by NumPy sums."""
    log_ref = np.asarray(world.log_ref)
    s = log_ref + (np.asarray(world.reward) + np.asarray(world.utility) @ lam) / BETA
    w = np.exp(s - s.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True), np.asarray(world.utility)[..., 0]


def _np_pred_gain(world, lam):
    """Exact E_{π_λ}[g_1] − E_ref[g_1] (the population dual's predicted gain)."""
    w, g = _np_tilt(world, lam)
    return np.mean(np.sum((w - np.exp(np.asarray(world.log_ref))) * g, axis=1))


def _np_hessian(world, lam):
    """∇²D(λ) = E_x Var_{π_λ}(g_1 | x) / β: [1, 1]."""
    w, g = _np_tilt(world, lam)
    mean = np.sum(w * g, axis=1, keepdims=True)
    return np.array([[np.mean(np.sum(w * (g - mean) ** 2, axis=1)) / BETA]])


def test_refine_converges_on_a_nonlinear_world_to_the_brute_force_root():
    """achieved(λ) = 0.5·p(λ) + 0.05 with p the exact predicted gain of π_λ (m = 1): from the one-shot λ* (where
    p = b), J = H then secant rounds converge superlinearly to the root of achieved(λ) = b (scipy brentq on NumPy
    sums)."""
    world = jax.jit(make_world, static_argnums=(1, 2, 3))(jax.random.key(0), 200, 8, 1)
    b = float(world.margins[0])
    lam_star = brentq(lambda t: _np_pred_gain(world, np.array([t])) - b, 0.0, 50.0, xtol=1e-13)
    achieved = lambda lam: 0.5 * _np_pred_gain(world, np.array([lam])) + 0.05  # noqa: E731
    root = brentq(lambda t: achieved(t) - b, 0.0, 50.0, xtol=1e-12)
    st = refine_init(jnp.array([lam_star]), jnp.asarray(_np_hessian(world, np.array([lam_star]))))
    errs = []
    for _ in range(4):
        st = refine_jit(st, jnp.array([achieved(float(st.lam[0]))]), world.margins)
        errs.append(abs(float(st.lam[0]) - root))
    # Superlinear, as a secant iteration should be: each ratio of successive errors smaller than the last.
    ratios = np.array(errs[1:]) / np.array(errs[:-1])
    assert np.all(np.diff(ratios) < 0) and errs[3] < 1e-4 * root, errs


def test_continuing_dpo_keeps_pi_ref_as_the_reference():
    """Continuing from a policy aligned at λ1 and training on labels at λ2 reaches the same policy as a fresh run
    from π_ref (the linear policy's DPO loss is convex): the loss measures log-ratios against π_ref, not against
    the previous policy (which would shift the answer by the first run's residual)."""
    from can_jax.sim.parametric import draw_world, make_family

    fam = make_family(jax.random.key(0), 2)
    world = draw_world(jax.random.key(1), fam, 300, 12)  # the shapes of test_parametric: compiled once
    smp = jax.jit(sample_scores, static_argnums=2)(jax.random.key(2), world, 8)
    lam1, lam2 = jnp.array([1.0, 0.5]), jnp.array([2.0, 1.5])
    key = jax.random.key(3)
    fit = jax.jit(lambda p, lam: train_dpo(p, world, make_pairs(key, smp, lam, "soft", 16), BETA, 1500, 0.05,
                                           "linear")[0])  # fmt: skip
    start = init_policy(None, world, "linear")
    first = fit(start, lam1)
    cont = fit(first, lam2)
    fresh = fit(start, lam2)
    lp_cont, lp_fresh = policy_log_probs(cont, world, "linear"), policy_log_probs(fresh, world, "linear")
    gap = float(jnp.abs(lp_cont - lp_fresh).max())
    moved = float(jnp.abs(policy_log_probs(first, world, "linear") - lp_fresh).max())
    # Had the first run's policy been the reference, continuing would land about `moved` away from the fresh run.
    assert gap < 0.05 * moved, (gap, moved)


def test_sensitivity_is_the_predicted_gains_and_their_derivative(small_groups, small_scores):
    """p(λ) from explicit per-prompt weights (tests/reference.py) and ∂p/∂λ by central differences of it."""
    from can_jax.dual import sensitivity
    from tests.reference import ref_predicted

    lam = np.array([0.3, 0.0, 1.2])
    p, hess = sensitivity(jnp.asarray(lam), small_scores, 0.7)
    np.testing.assert_allclose(p, ref_predicted(lam, small_groups, 0.7)[1], rtol=1e-10, atol=1e-12)
    eps = 1e-5
    fd = np.stack([(ref_predicted(lam + eps * e, small_groups, 0.7)[1] - ref_predicted(lam - eps * e, small_groups,
                                                                                      0.7)[1]) / (2 * eps)
                   for e in np.eye(3)], axis=1)  # fmt: skip
    np.testing.assert_allclose(hess, fd, rtol=1e-6, atol=1e-9)


def test_stop_rule_uses_simultaneous_intervals_and_the_floor():
    from scipy.stats import norm

    from can_jax.refine import simultaneous_level, stop_rule

    assert simultaneous_level(1) == pytest.approx(0.95) and simultaneous_level(8) == pytest.approx(1 - 0.05 / 8)
    # Bonferroni: 8 intervals at 1 − 0.05/8 each miss jointly with probability ≤ 0.05 (independent normals: 0.049).
    z = norm.ppf(0.5 + simultaneous_level(8) / 2)
    assert 1 - (2 * norm.cdf(z) - 1) ** 8 <= 0.05
    b = np.array([0.1, 0.2, -0.5])
    active = np.array([True, True, False])
    # Active within max(floor, h) of b, slack at least b less that: stop.
    stop, tol = stop_rule([0.115, 0.17, -0.52], [0.01, 0.03, 0.0], b, active, floor=0.02)
    assert stop and np.allclose(tol, [0.02, 0.03, 0.02])
    assert not stop_rule([0.125, 0.17, -0.52], [0.01, 0.03, 0.0], b, active)[0]  # 0.025 > max(0.02, 0.01)
    assert not stop_rule([0.1, 0.2, -0.53], [0.0, 0.0, 0.0], b, active)[0]  # the slack one below b − 0.02
    assert stop_rule([0.1, 0.2, 5.0], [0.0, 0.0, 0.0], b, active)[0]  # a slack constraint may exceed its margin
    assert not stop_rule([0.1, 0.2, 5.0], [0.0, 0.0, 0.0], b, np.ones(3, bool))[0]  # an active one may not
