"""The packed CPU pass (can_jax/packed.py) against the independent NumPy reference, and the solver on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import can_jax.solve as solve_module
from can_jax.packed import fast_jit, pack, packed_pass, recession_slope, units
from can_jax.scores import Scores
from can_jax.solve import solve_dual_jit
from tests.conftest import groups_to_scores, make_groups
from tests.reference import ref_grad, ref_hess, ref_predicted, ref_value

LAM = np.array([0.7, 0.0, 1.3])
B = np.array([0.1, -0.2, 0.3])

run_pass = fast_jit(packed_pass, static_argnames=("order",))
run_pack = fast_jit(pack, static_argnames=("block", "dtype"))


def ref_ess(lam, groups, beta):
    from scipy.special import softmax

    return np.mean([1.0 / (len(r) * np.sum(softmax((r + g @ lam) / beta) ** 2)) for r, g in groups])


def reward_shift(groups):
    return np.mean([r[0] for r, _ in groups])


def check_against_reference(ev, groups, beta, lam=LAM, b=B, rtol=1e-10):
    # The packed value leaves out each prompt's first reward (the shift), as a centring pass does.
    np.testing.assert_allclose(ev.value + reward_shift(groups), ref_value(lam, groups, b, beta), rtol=1e-12)
    np.testing.assert_allclose(ev.grad, ref_grad(lam, groups, b, beta), rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(ev.hess, ref_hess(lam, groups, b, beta), rtol=1e-9, atol=1e-12)
    rg, ug, kl = ref_predicted(lam, groups, beta)
    np.testing.assert_allclose(ev.reward_gain, rg, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ev.grad + b, ug, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ev.kl, kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ev.ess, ref_ess(lam, groups, beta), rtol=1e-10)


@pytest.mark.parametrize("beta,block", [(0.1, 7), (1.0, None), (10.0, 7)])
def test_pass_matches_independent_reference(small_groups, small_scores, beta, block):
    packed = run_pack(small_scores, block=block)
    check_against_reference(run_pass(jnp.asarray(LAM), packed, jnp.asarray(B), beta), small_groups, beta)


def test_large_per_prompt_offsets_and_nan_padding_change_nothing():
    groups = make_groups(3, 40, 9, 3, offset=1e6)
    sc = groups_to_scores(groups)
    # Padding may hold anything (`Scores`): NaN and inf there must not reach any sum.
    pad = ~sc.mask
    sc = sc._replace(reward=jnp.where(pad, jnp.nan, sc.reward), utility=jnp.where(pad[..., None], jnp.inf, sc.utility))
    ev = run_pass(jnp.asarray(LAM), run_pack(sc, block=16), jnp.asarray(B), 0.5)
    # The reference is exact up to the offsets' rounding: compare the shift-invariant parts.
    np.testing.assert_allclose(ev.grad, ref_grad(LAM, groups, B, 0.5), rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(ev.hess, ref_hess(LAM, groups, B, 0.5), rtol=1e-7, atol=1e-9)


def test_a_loose_bound_falls_back_to_the_exact_shift():
    groups = make_groups(5, 30, 12, 3)
    beta, lam = 0.002, np.array([3.0, 0.5, 2.0])
    # The bound Σ_c coef_c max_k y_c sits far above max_k s here: exp(s − bound) alone would underflow.
    gaps = []
    for r, g in groups:
        y = np.column_stack([r, g]) - np.concatenate([[r[0]], g[0]])
        coef = np.concatenate([[1.0], lam]) / beta
        gaps.append(coef @ y.max(axis=0) - (y @ coef).max())
    assert max(gaps) > 800
    ev = run_pass(jnp.asarray(lam), run_pack(groups_to_scores(groups)), jnp.asarray(B), beta)
    check_against_reference(ev, groups, beta, lam=lam, rtol=1e-9)


def test_empty_prompts_and_zero_weights():
    groups = make_groups(1, 12, 6, 3)
    sc = groups_to_scores(groups)
    # Two empty prompts (all padding, weight 1 as a hand-built table might have) and one weighted 0.
    n, k = sc.mask.shape
    mask = jnp.concatenate([sc.mask, jnp.zeros((2, k), bool)])
    sc = Scores(
        reward=jnp.concatenate([sc.reward, jnp.full((2, k), jnp.nan)]),
        utility=jnp.concatenate([sc.utility, jnp.ones((2, k, 3))]),
        mask=mask,
        weight=jnp.concatenate([sc.weight.at[4].set(0.0), jnp.ones(2)]),
    )
    ev = run_pass(jnp.asarray(LAM), run_pack(sc, block=5), jnp.asarray(B), 1.0)
    kept = [grp for i, grp in enumerate(groups) if i != 4]
    check_against_reference(ev, kept, 1.0)


def test_supplied_reference_utility():
    groups = make_groups(2, 25, 7, 3)
    sc = groups_to_scores(groups)
    ref = np.random.default_rng(0).normal(size=(25, 3))
    ev = run_pass(jnp.asarray(LAM), run_pack(sc._replace(ref_utility=jnp.asarray(ref))), jnp.asarray(B), 0.7)
    from scipy.special import softmax

    mu = np.mean([softmax((r + g @ LAM) / 0.7) @ g for r, g in groups], axis=0)
    np.testing.assert_allclose(ev.grad, mu - ref.mean(axis=0) - B, rtol=1e-10, atol=1e-12)


def test_units_reach_and_recession_slope_match_numpy():
    groups = make_groups(4, 30, 8, 3)
    packed = run_pack(groups_to_scores(groups), block=4)
    found, reach = units(packed)
    np.testing.assert_allclose(found.tot, 30)
    np.testing.assert_allclose(reach, np.mean([g.max(axis=0) - g.mean(axis=0) for _, g in groups], axis=0))
    np.testing.assert_allclose(found.spread2, np.sum([g.var(axis=0) for _, g in groups], axis=0), rtol=1e-10)
    np.testing.assert_allclose(found.r_spread2, np.sum([r.var() for r, _ in groups]), rtol=1e-10)
    np.testing.assert_allclose(found.mag, np.sum([np.abs(g).max(axis=0) for _, g in groups], axis=0), rtol=1e-12)
    np.testing.assert_allclose(found.r_shift, np.sum([r[0] for r, _ in groups]), rtol=1e-12)
    lam = np.array([0.5, 0.0, 2.0])
    u = lam / np.linalg.norm(lam)
    want = np.mean([(g @ u).max() - (g @ u).mean() for _, g in groups]) - u @ B
    np.testing.assert_allclose(recession_slope(packed, jnp.asarray(lam), jnp.asarray(B)), want, rtol=1e-10)


@pytest.mark.parametrize("seed,beta", [(0, 1.0), (1, 0.05), (2, 5.0)])
def test_solve_on_packed_scores_equals_the_blocked_pass(monkeypatch, seed, beta):
    """λ from the packed pass equals λ from the [N, K, m] pass to 1e-9 relative (each solve to its KKT tolerance)."""
    groups = make_groups(seed, 70 + seed, 10, 3)
    sc = groups_to_scores(groups)
    b = jnp.asarray([0.2, 0.1, -0.5])
    packed = solve_dual_jit(sc, b, beta)
    monkeypatch.setattr(solve_module, "packable", lambda *a, **k: False)
    blocked = solve_dual_jit.plain(sc, b, beta, max_iter=99)  # another static argument: traced again, unpacked
    assert int(packed.status) == int(blocked.status) == 0
    np.testing.assert_allclose(packed.x, blocked.x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(packed.predicted.kl, blocked.predicted.kl, rtol=1e-9)
    np.testing.assert_allclose(packed.reach, blocked.reach, rtol=1e-12)


def test_solve_takes_packed_scores_and_float32(small_scores):
    b = jnp.asarray([0.2, 0.1, -0.5])
    want = solve_dual_jit(small_scores, b, 1.0)
    got = solve_dual_jit(run_pack(small_scores), b, 1.0)
    np.testing.assert_allclose(got.x, want.x, rtol=1e-9)
    f32 = solve_dual_jit(run_pack(small_scores, dtype=jnp.float32), b.astype(jnp.float32), 1.0)
    assert f32.x.dtype == jnp.float32
    np.testing.assert_allclose(f32.x, want.x, rtol=1e-3)


def test_fast_jit_nests_inside_other_programs(small_scores):
    b = jnp.asarray([0.2, 0.1, -0.5])
    top = solve_dual_jit(small_scores, b, 1.0).x
    inside = jax.jit(lambda sc: solve_dual_jit(sc, b, 1.0).x)(small_scores)
    constants_only = jax.jit(lambda: solve_dual_jit(small_scores, b, 1.0).x)()
    batched = jax.vmap(lambda bt: solve_dual_jit(small_scores, b, bt).x)(jnp.asarray([1.0, 2.0]))
    np.testing.assert_allclose(inside, top, rtol=1e-12)
    np.testing.assert_allclose(constants_only, top, rtol=1e-12)
    np.testing.assert_allclose(batched[0], top, rtol=1e-10)


@pytest.mark.parametrize("beta", [0.7, 1e-3])
def test_bias_pass_on_packed_scores_equals_the_blocked_one(beta):
    """The jackknife's sums on packed scores against `_jack_block` (itself checked against brute-force leave-one-out
    and autodiff in test_bias*.py), ragged K, weights, a supplied E_ref[g]; β = 1e-3 puts ~all the weight on one
    response (gaps of thousands in s)."""
    from can_jax.bias import blocked_pass, packed_block_pass
    from can_jax.dual import to_blocks
    from can_jax.sim.synthetic import synthetic_scores

    sc = synthetic_scores(jax.random.key(5), 40, 6, 3, ragged=True)
    sc = sc._replace(weight=jnp.linspace(0.5, 2.0, 40), ref_utility=jnp.linspace(-0.3, 0.3, 120).reshape(40, 3))
    b = jnp.array([0.2, 0.1, 0.05])
    lam = jnp.array([0.8, 0.3, 0.0]) * (1.0 if beta > 0.1 else 0.01)
    for first in (True, False):
        want = blocked_pass(lam, to_blocks(sc, 16), b, beta, first)
        got = packed_block_pass(lam, run_pack(sc, block=16), b, beta, first)
        for key in want:
            for w, g in zip(jax.tree.leaves(want[key]), jax.tree.leaves(got[key])):
                np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11, err_msg=key)


def test_sandwich_on_packed_scores_matches_numpy():
    """H⁻¹ Σ H⁻¹ / N with Σ the prompts' covariance of ∇ℓ_i, computed prompt by prompt in NumPy."""
    from scipy.special import softmax

    from can_jax.inference import sandwich_covariance, solve_with_errors

    groups = make_groups(6, 50, 9, 3)
    sc = groups_to_scores(groups)
    b = jnp.asarray([0.2, 0.1, -0.5])
    res, errs = solve_with_errors(sc, b, 1.0)
    lam = np.asarray(res.x)
    scores_i = np.array([softmax(r + g @ lam) @ g - g.mean(axis=0) - np.asarray(b) for r, g in groups])
    sigma = np.cov(scores_i.T, bias=True)
    free = lam > 0
    h_inv = np.zeros((3, 3))
    h_inv[np.ix_(free, free)] = np.linalg.inv(ref_hess(lam, groups, np.asarray(b), 1.0)[np.ix_(free, free)])
    want = h_inv @ sigma @ h_inv / len(groups)
    got = sandwich_covariance(res.x, res.hess, run_pack(sc), b, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(errs[free], np.sqrt(np.diag(want))[free], rtol=1e-8)


@pytest.mark.parametrize("equal_k", [True, False])
@pytest.mark.parametrize("float32", [False, True])
def test_packing_from_columns_equals_packing_the_padded_scores(equal_k, float32):
    """`packed.from_grouped` (the table reader's path) against `pack` of the padded `Scores` of the same columns:
    rows unsorted, prompts with one response and none, a supplied E_ref[g], N not a multiple of the block; float32
    columns packed in float64 exactly (the shift subtracted after widening)."""
    from can_jax.packed import from_grouped as packed_from_grouped
    from can_jax.scores import from_grouped

    rng = np.random.default_rng(1)
    n, k = 29, 6
    counts = np.full(n, k) if equal_k else rng.integers(0, k + 1, n)
    if not equal_k:
        counts[[2, 5]] = [1, 0]
    idx = np.repeat(np.arange(n), counts)
    if not equal_k:
        idx = idx[rng.permutation(len(idx))]
    dt = np.float32 if float32 else np.float64
    r = (rng.normal(size=len(idx)) * 3 + 1000.1).astype(dt)
    g = tuple(rng.normal(size=len(idx)).astype(dt) - 3.3 for _ in range(2))
    ref = rng.normal(size=(n, 2)).astype(dt).astype(np.float64)  # (padded Scores keep E_ref in the columns' dtype)
    for ref_u in (None, ref):
        got = packed_from_grouped(idx, r, g, counts=counts, ref_utility=ref_u, block=8)
        sc = from_grouped(idx, r, g, counts=counts, ref_utility=ref_u)
        want = run_pack(sc, block=8, dtype=jnp.float64)
        for f in want._fields:
            np.testing.assert_array_equal(np.asarray(getattr(got, f)), np.asarray(getattr(want, f)), err_msg=f)
        assert got.x.dtype == jnp.float64


def test_prompts_with_one_response_match_the_reference():
    groups = make_groups(7, 20, 6, 3, k_min=1)
    groups += [(np.array([0.4]), np.array([[0.1, -0.2, 0.3]]))]  # surely one K_i = 1
    ev = run_pass(jnp.asarray(LAM), run_pack(groups_to_scores(groups), block=6), jnp.asarray(B), 0.8)
    check_against_reference(ev, groups, 0.8)


def test_scalar_margins_broadcast():
    from can_jax.inference import solve_with_errors

    sc = groups_to_scores(make_groups(8, 30, 6, 2))
    res, errs = solve_with_errors(sc, 0.1, 1.0)
    want, _ = solve_with_errors(sc, jnp.asarray([0.1, 0.1]), 1.0)
    np.testing.assert_allclose(res.x, want.x, rtol=1e-12)
    np.testing.assert_allclose(errs, _, rtol=1e-12, equal_nan=True)
