"""Issue #13, the library half: no wrong answer with a success status on bad or extreme inputs.

Every λ is checked against the independent NumPy/scipy reference of tests/reference.py, never against the solver.
Tested domain of the scale invariance (DESIGN §2: λ* is invariant when r, g, b and β are scaled together by c):
c = 2^k for k in [-40, 40] (exact in binary floating point: the same λ bits and the same status) and
c in [1e-12, 1e12] for decimal factors (λ equal to rounding, the same status); per-response offsets up to 1e9.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from can_jax.certify import infeasibility_message
from can_jax.errors import CanError
from can_jax.inference import bootstrap, solve_with_errors, standard_error_notes
from can_jax.result import Status
from can_jax.scores import from_padded
from can_jax.solve import solve_dual, solve_dual_jit
from can_jax.sweep import sweep_jit
from tests.conftest import groups_to_scores, make_groups
from tests.reference import ref_grad, ref_solve_lbfgsb, ref_value

PROBLEM = make_groups(9, 40, 6, 2)
B = np.array([0.2, 0.1])
REF = ref_solve_lbfgsb(PROBLEM, B, 1.0)
_bootstrap = jax.jit(bootstrap, static_argnames=("n_boot",))
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scaled(c, offset=0.0):
    return groups_to_scores([(c * r + offset, c * g + offset) for r, g in PROBLEM])


def _status(res):
    return Status(int(res.status))


@pytest.mark.parametrize("k", [-40, -27, -1, 0, 13, 40])
def test_power_of_two_scaling_keeps_lambda_bits_and_status(k):
    c = 2.0**k
    base = solve_dual_jit(_scaled(1.0), jnp.asarray(B), 1.0)
    res = solve_dual_jit(_scaled(c), jnp.asarray(B * c), c)
    assert _status(res) == _status(base) == Status.CONVERGED
    np.testing.assert_array_equal(np.asarray(res.x), np.asarray(base.x))
    np.testing.assert_allclose(res.x, REF, rtol=1e-7)


@SETTINGS
@given(st.floats(-12, 12))
def test_decimal_scaling_keeps_lambda_and_status(log_c):
    c = 10.0**log_c
    res = solve_dual_jit(_scaled(c), jnp.asarray(B * c), c)
    assert _status(res) == Status.CONVERGED, res.message
    np.testing.assert_allclose(res.x, REF, rtol=1e-7)


@pytest.mark.parametrize("c", [1e-12, 1e-8, 1e12])
def test_the_issues_scales(c):
    """At 1e-8 the absolute tolerance stopped 1.3% off; at 1e12 it never converged; at 1e-12 it said infeasible."""
    res = solve_dual_jit(_scaled(c), jnp.asarray(B * c), c)
    assert _status(res) == Status.CONVERGED, res.message
    np.testing.assert_allclose(res.x, REF, rtol=1e-7)


@pytest.mark.parametrize("offset", [1e6, 1e9, -1e9])
def test_large_offsets_converge_to_the_offset_free_lambda(offset):
    res = solve_dual_jit(_scaled(1.0, offset), jnp.asarray(B), 1.0)
    assert _status(res) == Status.CONVERGED, res.message
    # The offset costs the data its low bits (1e9 + x keeps x to ~1e-7): λ* of the data as stored.
    np.testing.assert_allclose(res.x, REF, rtol=1e-5)


def test_large_scale_with_small_beta_converges():
    """×1e6 with β = 1e-3 (relative β 1e-9: nearly a linear programme) ended at the iteration limit."""
    c, beta = 1e6, 1e-3
    res = solve_dual_jit(_scaled(c), jnp.asarray(B * c), beta)
    assert _status(res) == Status.CONVERGED, res.message
    lam = np.asarray(res.x)
    ref = ref_solve_lbfgsb(PROBLEM, B, beta / c)
    scaled = [(c * r, c * g) for r, g in PROBLEM]
    v, v_ref = ref_value(lam, scaled, B * c, beta), ref_value(ref, scaled, B * c, beta)
    assert v <= v_ref + 1e-9 * abs(v_ref)


def test_zero_margin_on_a_constant_utility_is_feasible():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(30, 5))
    for g in [np.ones((30, 5, 1)), np.repeat(rng.normal(size=(30, 1, 1)), 5, axis=1)]:
        res = solve_dual_jit(from_padded(r, g), jnp.array([0.0]), 1.0)
        assert _status(res) == Status.CONVERGED, res.message
        assert float(res.x[0]) == 0.0
    # A positive margin there is out of reach, and the shortfall printed is positive.
    res = solve_dual_jit(from_padded(r, np.ones((30, 5, 1))), jnp.array([0.1]), 1.0)
    assert _status(res) == Status.INFEASIBLE
    msg = infeasibility_message(res, ["c"], [0.1])
    assert "short by 0.1" in msg and "−" not in msg and "by -" not in msg


@pytest.mark.parametrize(
    "noise, margins",
    [(0.0, (0.2, 0.2)), (1e-6, (0.2, 0.2)), (1e-3, (0.2, 0.2)), (0.0, (0.0, 1e-4)), (1e-6, (0.0, 1e-4)),
     (1e-3, (0.0, 1e-2))],
)  # fmt: skip
def test_nearly_opposite_constraints_are_infeasible_with_the_direction(noise, margins):
    groups = make_groups(2, 100, 8, 1)
    rng = np.random.default_rng(1)
    groups = [(r, np.concatenate([g, -g + noise * rng.normal(size=g.shape)], 1)) for r, g in groups]
    # Independent check that the pair is jointly out of reach: the best any policy does in a + b.
    edge = np.mean([(g[:, 0] + g[:, 1]).max() - (g[:, 0] + g[:, 1]).mean() for _, g in groups])
    assert edge < sum(margins)
    res = solve_dual_jit(groups_to_scores(groups), jnp.asarray(margins), 1.0)
    assert _status(res) == Status.INFEASIBLE, res.message
    msg = infeasibility_message(res, ["a", "b"], np.asarray(margins))
    assert "jointly" in msg and "·a" in msg and "·b" in msg
    assert "by -" not in msg and "by −" not in msg and "by 0 " not in msg


def test_padding_values_cannot_leak_into_the_solution():
    rng = np.random.default_rng(3)
    r, g = rng.normal(size=(20, 4)), rng.normal(size=(20, 4, 1))
    mask = np.ones((20, 4), bool)
    mask[::2, 3] = False
    groups = [(r[i][mask[i]], g[i][mask[i]]) for i in range(20)]
    ref = ref_solve_lbfgsb(groups, np.array([0.1]), 1.0)
    clean = from_padded(r, g, mask)
    for fill in [1e3, np.inf, np.nan]:
        dirty = clean._replace(
            reward=jnp.where(clean.mask, clean.reward, fill),
            utility=jnp.where(clean.mask[..., None], clean.utility, fill),
        )
        res = solve_dual_jit(dirty, jnp.array([0.1]), 1.0)
        assert _status(res) == Status.CONVERGED, res.message
        np.testing.assert_allclose(res.x, ref, rtol=1e-7)
        assert np.isfinite(float(res.predicted.ess))


@pytest.mark.parametrize("beta", [-1.0, 0.0, np.nan, np.inf])
def test_bad_beta_is_refused_at_the_boundary_and_a_status_under_jit(beta, small_scores):
    with pytest.raises(CanError, match="beta"):
        solve_dual(small_scores, jnp.array([0.1, 0.1, -1.0]), beta)
    res = sweep_jit(small_scores, jnp.array([[0.1, 0.1, -1.0]] * 2), jnp.array([1.0, beta]))
    assert [Status(int(s)) for s in res.status] == [Status.CONVERGED, Status.INVALID]
    res = solve_dual_jit(small_scores, jnp.array([0.1, 0.1, -1.0]), beta)
    assert _status(res) == Status.INVALID and "beta" in res.message


@pytest.mark.parametrize("tol", [-1e-9, 0.0, np.nan])
def test_bad_tol_is_refused_at_the_boundary_and_a_status_in_sweeps(tol, small_scores):
    b = jnp.array([0.1, 0.1, -1.0])
    with pytest.raises(CanError, match="tol"):
        solve_dual(small_scores, b, 1.0, tol=tol)
    res = solve_dual_jit(small_scores, b, 1.0, tol=tol)
    assert _status(res) == Status.INVALID and "tol" in res.message
    res = sweep_jit(small_scores, jnp.stack([b, b]), 1.0, tol=tol)
    assert [Status(int(s)) for s in res.status] == [Status.INVALID] * 2
    res = sweep_jit(small_scores, jnp.stack([b, b]), 1.0, tol=1e-9)
    assert [Status(int(s)) for s in res.status] == [Status.CONVERGED] * 2


def test_nan_margin_is_refused(small_scores):
    with pytest.raises(CanError, match="margin"):
        solve_dual(small_scores, jnp.array([np.nan, 0.1, -1.0]), 1.0)
    res = sweep_jit(small_scores, jnp.array([[np.nan, 0.1, -1.0], [0.1, 0.1, -1.0]]), jnp.array([1.0, 1.0]))
    assert [Status(int(s)) for s in res.status] == [Status.INVALID, Status.CONVERGED]


def test_float32_ess_with_padded_prompts_is_finite():
    groups = make_groups(4, 37, 7, 2)
    sc = groups_to_scores(groups, dtype=jnp.float32)
    res = solve_dual_jit(sc, jnp.array([0.2, 0.1], jnp.float32), 1.0, block=8)  # 37 prompts pad to 40
    assert np.isfinite(float(res.predicted.ess)) and 0 < float(res.predicted.ess) <= 1
    assert _status(res) == Status.CONVERGED
    g = ref_grad(np.asarray(res.x, float), groups, np.array([0.2, 0.1]), 1.0)
    assert np.max(np.abs(np.minimum(np.asarray(res.x), g))) < 1e-4


def test_bootstrap_reports_statuses_and_failed_replicates(small_scores):
    margins = jnp.array([0.3, 0.15, -0.5])
    boot = _bootstrap(jax.random.key(0), small_scores, margins, 1.0, n_boot=8)
    assert boot.x.shape == (8, 3) and boot.status.shape == (8,)
    assert int(boot.failed) == 0 and np.all(np.asarray(boot.status) == Status.CONVERGED)
    # Margins at the edge of the full data fail on some resamples: counted, and their λ is NaN, not λ₀.
    reach = float(solve_dual_jit(small_scores, margins, 1.0).reach[0])
    edge = margins.at[0].set(reach * 0.999)
    boot = _bootstrap(jax.random.key(1), small_scores, edge, 1.0, n_boot=8)
    failed = np.asarray(boot.status) != Status.CONVERGED
    assert int(boot.failed) == failed.sum() > 0
    assert np.all(np.isnan(np.asarray(boot.x)[failed]))


def test_undefined_standard_errors_are_nan_with_a_reason():
    rng = np.random.default_rng(0)
    # Two identical utility columns: the active Hessian is singular, λ₁ + λ₂ is determined but not each.
    g = rng.normal(size=(50, 6, 1))
    sc = from_padded(rng.normal(size=(50, 6)), np.concatenate([g, g], 2))
    res, se = solve_with_errors(sc, jnp.array([0.2, 0.2]), 1.0)
    se = np.asarray(se)
    notes = standard_error_notes(res, sc)
    assert standard_error_notes(res, sc, se) == notes  # read off the NaNs, as `can dual` does
    assert np.all(np.isnan(se[np.asarray(res.x) > 0]))
    assert all("singular" in n for n, x in zip(notes, np.asarray(res.x)) if x > 0)
    # One prompt (the other 49 weigh nothing: the same shapes, one compilation): no spread across prompts.
    weight = np.zeros(50)
    weight[0] = 1.0
    one = from_padded(rng.normal(size=(50, 6)), rng.normal(size=(50, 6, 2)), weight=weight)
    res, se = solve_with_errors(one, jnp.array([0.05, -10.0]), 1.0)
    assert _status(res) == Status.CONVERGED and float(res.x[0]) > 0
    assert np.isnan(float(se[0]))
    assert "1 prompt" in standard_error_notes(res, one)[0]
    assert standard_error_notes(res, one, se) == standard_error_notes(res, one)


REACH = np.mean([g.max(axis=0) - g.mean(axis=0) for _, g in PROBLEM], axis=0)  # independent: max − mean per prompt


@SETTINGS
@given(st.floats(-0.5, 1.3), st.floats(-0.5, 1.3), st.integers(-30, 30), st.floats(-1e3, 1e3))
def test_status_and_lambda_invariant_under_joint_scaling_and_offsets(f1, f2, k, offset):
    """Within the stated domain (c = 2^k, |k| ≤ 30, offsets up to 1e3 added to r and g), the status and λ* of
    any margins — feasible, at the edge or beyond it — are those of the unscaled problem."""
    b = np.array([f1, f2]) * REACH
    base = solve_dual_jit(_scaled(1.0), jnp.asarray(b), 1.0)
    c = 2.0**k
    res = solve_dual_jit(_scaled(c, offset * c), jnp.asarray(b * c), c)
    assert _status(res) == _status(base)
    beyond = np.any(b > REACH)
    assert _status(base) == Status.INFEASIBLE if beyond else _status(base) in (Status.CONVERGED, Status.INFEASIBLE)
    if _status(base) == Status.CONVERGED:
        np.testing.assert_allclose(res.x, base.x, rtol=1e-6, atol=1e-9)
