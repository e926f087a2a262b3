"""`scores.from_grouped`, the bridge's fast padded-layout builder (issue 22), against a per-row reference, and a
float32 table solved in float64 block by block against the same table converted to float64 up front."""

import jax.numpy as jnp
import numpy as np
import pytest

from can_jax.errors import ScoresFormatError
from can_jax.scores import from_grouped, from_padded
from can_jax.solve import solve_dual_jit


def per_row_reference(idx, r, g):
    """Padded arrays the slow obvious way: one Python step per row."""
    n, k = idx.max() + 1, np.bincount(idx).max()
    rp, gp, mask = np.zeros((n, k)), np.zeros((n, k, g.shape[1])), np.zeros((n, k), bool)
    fill = np.zeros(n, int)
    for i, row in enumerate(idx):
        rp[row, fill[row]], gp[row, fill[row]], mask[row, fill[row]] = r[i], g[i], True
        fill[row] += 1
    return rp, gp, mask


@pytest.mark.parametrize("layout", ["grouped-equal", "grouped-ragged", "shuffled"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_a_per_row_build(layout, dtype):
    rng = np.random.default_rng(0)
    counts = np.full(30, 5) if layout == "grouped-equal" else rng.integers(1, 8, 30)
    idx = np.repeat(np.arange(30), counts)
    if layout == "shuffled":
        idx = idx[rng.permutation(len(idx))]
    r, g = rng.normal(size=len(idx)).astype(dtype), rng.normal(size=(len(idx), 3)).astype(dtype)
    rp, gp, mask = per_row_reference(idx, r, g)
    for util in (g, np.asfortranarray(g), tuple(g.T)):
        sc = from_grouped(idx, r, util)
        assert sc.reward.dtype == dtype and sc.utility.dtype == dtype
        np.testing.assert_array_equal(np.asarray(sc.mask), mask)
        np.testing.assert_array_equal(np.asarray(sc.reward), rp.astype(dtype))
        np.testing.assert_array_equal(np.asarray(sc.utility), gp.astype(dtype))
        np.testing.assert_array_equal(np.asarray(sc.weight), np.ones(30))


def test_rejects_mismatched_lengths_and_too_many_responses():
    with pytest.raises(ScoresFormatError):
        from_grouped(np.array([0, 0, 1]), np.zeros(2), np.zeros((3, 1)))
    with pytest.raises(ScoresFormatError):
        from_grouped(np.array([0, 0, 1]), np.zeros(3), np.zeros((3, 1)), max_responses=1)


def test_float32_table_solved_in_float64_matches_the_converted_table():
    rng = np.random.default_rng(1)
    n, k, m = 400, 8, 2
    h = rng.normal(size=(n, k))
    r = (20 + 3 * h + rng.normal(size=(n, k))).astype(np.float32)
    g = (-0.5 * h[..., None] + rng.normal(size=(n, k, m)) + rng.normal(size=(n, 1, m))).astype(np.float32)
    idx = np.repeat(np.arange(n), k)
    sc32 = from_grouped(idx, r.reshape(-1), g.reshape(-1, m))
    assert sc32.utility.dtype == jnp.float32
    b = jnp.array([0.2, 0.1])
    res = solve_dual_jit(sc32, b, 1.0, dtype=jnp.float64)
    ref = solve_dual_jit(from_padded(r.astype(np.float64), g.astype(np.float64)), b, 1.0)
    assert res.x.dtype == jnp.float64 and int(res.status) == int(ref.status) == 0
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-9, atol=1e-12)


def test_kkt_check_of_a_float32_table_in_float64():
    """`kkt_at` (the certificate check) on float32 scores in float64: the float64 solve's λ passes at 1e-9, a moved
    λ does not; the residual agrees with the one computed on the converted table."""
    from can_jax.solve import kkt_at

    rng = np.random.default_rng(2)
    r = (5 + rng.normal(size=(300, 6))).astype(np.float32)
    g = (0.5 * rng.normal(size=(300, 6, 2)) - 0.3 * r[..., None]).astype(np.float32)
    sc32 = from_grouped(np.repeat(np.arange(300), 6), r.reshape(-1), g.reshape(-1, 2))
    b = jnp.array([0.1, 0.05])
    res = solve_dual_jit(sc32, b, 1.0, dtype=jnp.float64)
    got, _ = kkt_at(sc32, b, 1.0, res.x, dtype=jnp.float64)
    assert float(got) <= 1e-9
    moved, _ = kkt_at(sc32, b, 1.0, res.x * 1.01, dtype=jnp.float64)
    want, _ = kkt_at(from_padded(r.astype(np.float64), g.astype(np.float64)), b, 1.0, res.x * 1.01)
    assert float(moved) > 1e-6
    np.testing.assert_allclose(float(moved), float(want), rtol=1e-9)
