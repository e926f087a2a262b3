import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from can_jax.result import Status
from can_jax.scores import from_padded
from can_jax.solve import solve_dual, solve_dual_jit
from tests.conftest import groups_to_scores, make_groups
from tests.reference import ref_grad, ref_predicted, ref_solve_cvxpy, ref_solve_lbfgsb, ref_value

# Active and slack constraints together: the third margin is loose (negative), so λ₃* = 0.
MARGINS = np.array([0.3, 0.15, -0.5])


def test_matches_scipy_lbfgsb_and_cvxpy_clarabel(small_groups, small_scores):
    res = solve_dual_jit(small_scores, jnp.asarray(MARGINS), 1.0)
    assert res.status == Status.CONVERGED and res.kkt_residual <= 1e-9
    lam_scipy = ref_solve_lbfgsb(small_groups, MARGINS, 1.0)
    lam_cvx = ref_solve_cvxpy(small_groups, MARGINS, 1.0)
    np.testing.assert_allclose(res.x, lam_scipy, atol=1e-6)
    np.testing.assert_allclose(res.x, lam_cvx, atol=1e-6)
    assert res.x[0] > 0 and res.x[1] > 0 and res.x[2] == 0.0
    np.testing.assert_array_equal(res.active, [True, True, False])


@pytest.mark.parametrize("beta", [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3])
def test_beta_from_1e_minus_3_to_1e3(beta):
    groups = make_groups(5, 80, 12, 2, offset=15.0)
    # Margins as a fraction of what is reachable keep the problem feasible at every β.
    margins = np.array([0.2, 0.1])
    res = solve_dual_jit(groups_to_scores(groups), jnp.asarray(margins), beta)
    assert res.status == Status.CONVERGED, res.message
    # KKT checked with the independent reference gradient, not the solver's own.
    g = ref_grad(np.asarray(res.x), groups, margins, beta)
    assert np.max(np.abs(np.minimum(np.asarray(res.x), g))) < 1e-8
    ref = ref_solve_lbfgsb(groups, margins, beta)
    v_ours, v_ref = ref_value(np.asarray(res.x), groups, margins, beta), ref_value(ref, groups, margins, beta)
    assert v_ours <= v_ref + 1e-10 * (1 + abs(v_ref))
    if res.cond < 1e6:  # λ itself is only well determined where the dual is well conditioned
        np.testing.assert_allclose(res.x, ref, rtol=1e-5, atol=1e-6 * (1 + np.abs(ref).max()))


def test_newton_iterations_bounded(small_scores):
    res = solve_dual_jit(small_scores, jnp.asarray(MARGINS), 1.0)
    assert res.nit <= 12


def test_predicted_outcome_matches_reference(small_groups, small_scores):
    res = solve_dual_jit(small_scores, jnp.asarray(MARGINS), 1.0)
    rg, ug, kl = ref_predicted(np.asarray(res.x), small_groups, 1.0)
    np.testing.assert_allclose(res.predicted.reward_gain, rg, rtol=1e-10)
    np.testing.assert_allclose(res.predicted.utility_gain, ug, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.predicted.kl, kl, rtol=1e-10)
    # At an active constraint the predicted gain equals its margin (KKT, DESIGN §2).
    np.testing.assert_allclose(res.predicted.utility_gain[:2], MARGINS[:2], atol=1e-9)
    assert 0 < res.predicted.ess <= 1


def test_min_eig_and_cond_of_the_active_block(small_scores):
    res = solve_dual_jit(small_scores, jnp.asarray(MARGINS), 1.0)
    block = np.asarray(res.hess)[:2, :2]
    eig = np.linalg.eigvalsh(block)
    np.testing.assert_allclose(res.min_eig, eig[0], rtol=1e-10)
    np.testing.assert_allclose(res.cond, eig[-1] / eig[0], rtol=1e-10)


def test_float32_solve_agrees_with_float64():
    groups = make_groups(11, 300, 16, 3)
    r64 = solve_dual_jit(groups_to_scores(groups), jnp.asarray(MARGINS), 1.0)
    r32 = solve_dual_jit(groups_to_scores(groups, dtype=jnp.float32), jnp.asarray(MARGINS, jnp.float32), 1.0)
    assert r32.x.dtype == jnp.float32
    assert r32.status in (Status.CONVERGED, Status.PRECISION)
    np.testing.assert_allclose(r32.x, r64.x, rtol=1e-4, atol=1e-5)


def test_single_constraint_beyond_reach_is_infeasible(small_groups, small_scores):
    reach = np.mean([g.max(axis=0) - g.mean(axis=0) for _, g in small_groups], axis=0)
    margins = MARGINS.copy()
    margins[1] = reach[1] + 0.05
    res = solve_dual_jit(small_scores, jnp.asarray(margins), 1.0)
    assert res.status == Status.INFEASIBLE
    np.testing.assert_allclose(res.reach, reach, rtol=1e-12)


def test_jointly_infeasible_margins_are_certified():
    """g₂ = −g₁: each margin alone is reachable, both together are not (improving one worsens the other)."""
    groups = make_groups(2, 100, 8, 1)
    groups = [(r, np.concatenate([g, -g], axis=1)) for r, g in groups]
    margins = np.array([0.2, 0.2])
    res = solve_dual_jit(groups_to_scores(groups), jnp.asarray(margins), 1.0)
    assert np.all(margins < np.asarray(res.reach))
    assert res.status == Status.INFEASIBLE
    assert res.slope < 0
    from can_jax.certify import infeasibility_message

    msg = infeasibility_message(res, ["a", "b"], margins)
    assert "infeasible" in msg and "jointly" in msg


def test_feasible_near_the_edge_converges_with_large_lambda(small_groups, small_scores):
    reach = np.mean([g.max(axis=0) - g.mean(axis=0) for _, g in small_groups], axis=0)
    margins = np.array([0.97 * reach[0], -1.0, -1.0])
    res = solve_dual_jit(small_scores, jnp.asarray(margins), 1.0)
    assert res.status == Status.CONVERGED
    assert res.x[0] > 3.0
    np.testing.assert_allclose(res.x, ref_solve_lbfgsb(small_groups, margins, 1.0), rtol=1e-5)


def test_one_response_everywhere_is_degenerate():
    rng = np.random.default_rng(0)
    sc = from_padded(rng.normal(size=(50, 1)), rng.normal(size=(50, 1, 2)))
    res = solve_dual(sc, jnp.array([0.1, -0.1]), 1.0)
    assert res.status == Status.INFEASIBLE  # nothing can move: reach is 0
    np.testing.assert_allclose(res.reach, 0.0, atol=1e-15)
    res = solve_dual(sc, jnp.array([-0.1, -0.1]), 1.0)
    assert res.status == Status.CONVERGED and np.all(res.x == 0)


def test_constant_utility_within_prompts_has_zero_reach():
    rng = np.random.default_rng(0)
    g = np.repeat(rng.normal(size=(40, 1, 1)), 6, axis=1)  # varies across prompts only
    g = np.concatenate([g, rng.normal(size=(40, 6, 1))], axis=2)
    sc = from_padded(rng.normal(size=(40, 6)), g)
    res = solve_dual(sc, jnp.array([0.05, 0.1]), 1.0)
    assert res.status == Status.INFEASIBLE
    assert abs(float(res.reach[0])) < 1e-12


def test_nan_scores_give_a_status_not_a_silent_nan():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(20, 4))
    r[3, 2] = np.nan
    res = solve_dual(from_padded(r, rng.normal(size=(20, 4, 1))), jnp.array([0.1]), 1.0)
    assert res.status == Status.NONFINITE
    assert "non-finite" in res.message


def test_no_retrace_for_same_shapes(small_scores):
    solve = chex.assert_max_traces(n=1)(solve_dual)
    f = jax.jit(solve)
    f(small_scores, jnp.asarray(MARGINS), 1.0)
    f(small_scores, jnp.asarray(MARGINS) * 0.5, 2.0)  # new margins and β: no recompilation


# ---------------------------------------------------------------- invariances (DESIGN §2), property-based
PROBLEM = make_groups(9, 40, 6, 2)
BASE = solve_dual_jit(groups_to_scores(PROBLEM), jnp.array([0.2, 0.1]), 1.0)
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(st.floats(-50, 50), min_size=40, max_size=40), st.integers(0, 2))
def test_per_prompt_constants_leave_lambda_unchanged(offsets, which):
    shifted = []
    for (r, g), c in zip(PROBLEM, offsets):
        r, g = r.copy(), g.copy()
        if which == 0:
            r += c
        else:
            g[:, which - 1] += c
        shifted.append((r, g))
    res = solve_dual_jit(groups_to_scores(shifted), jnp.array([0.2, 0.1]), 1.0)
    assert res.status == Status.CONVERGED
    np.testing.assert_allclose(res.x, BASE.x, rtol=1e-7, atol=1e-9)


@SETTINGS
@given(st.floats(0.05, 20.0))
def test_joint_scaling_of_scores_margins_and_beta(c):
    scaled = [(c * r, c * g) for r, g in PROBLEM]
    res = solve_dual_jit(groups_to_scores(scaled), jnp.array([0.2, 0.1]) * c, c * 1.0)
    assert res.status == Status.CONVERGED
    np.testing.assert_allclose(res.x, BASE.x, rtol=1e-7, atol=1e-9)


@SETTINGS
@given(st.lists(st.floats(-0.5, 1.0), min_size=2, max_size=6, unique=True))
def test_lambda_monotone_in_margin_for_one_constraint(margins):
    groups = [(r, g[:, :1]) for r, g in PROBLEM]
    sc = groups_to_scores(groups)
    lams = []
    for b in sorted(margins):
        res = solve_dual_jit(sc, jnp.array([b]), 1.0)
        if res.status == Status.INFEASIBLE:
            break
        assert res.status == Status.CONVERGED
        lams.append(float(res.x[0]))
    assert all(a <= b + 1e-9 for a, b in zip(lams, lams[1:]))


def test_warm_start_on_a_subsample_reaches_the_same_lambda():
    """With ≥ 64 blocks the solver first solves on 1/16 of the prompts; the answer must not change."""
    groups = make_groups(12, 1200, 8, 3)
    sc = groups_to_scores(groups)
    cold = solve_dual(sc, jnp.asarray(MARGINS), 1.0, block=8, warm_start=False)
    warm = solve_dual(sc, jnp.asarray(MARGINS), 1.0, block=8, warm_start=True)
    assert cold.status == warm.status == Status.CONVERGED
    np.testing.assert_allclose(warm.x, cold.x, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(warm.x, ref_solve_lbfgsb(groups, MARGINS, 1.0), atol=1e-6)
    assert warm.nit < cold.nit  # the full-data Newton starts close to λ*
    # Margins out of reach on the subsample and on the full data: still reported, not hidden by the warm start.
    far = solve_dual(sc, jnp.array([50.0, 0.1, -1.0]), 1.0, block=8, warm_start=True)
    assert far.status == Status.INFEASIBLE
