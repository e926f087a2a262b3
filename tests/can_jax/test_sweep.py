import jax.numpy as jnp
import numpy as np

from can_jax.result import Status
from can_jax.solve import solve_dual_jit
from can_jax.sweep import margin_grid, sweep_jit


def test_sweep_equals_pointwise_solves_and_marks_infeasible(small_scores):
    base = jnp.array([0.3, 0.15, -0.5])
    values = jnp.linspace(-0.3, 3.0, 12)
    grid = margin_grid(base, 0, values)
    res = sweep_jit(small_scores, grid, 1.0)
    assert res.x.shape == (12, 3)
    for i in range(12):
        one = solve_dual_jit(small_scores, grid[i], 1.0)
        assert int(res.status[i]) == int(one.status)
        if one.status == Status.CONVERGED:
            np.testing.assert_allclose(res.x[i], one.x, rtol=1e-8, atol=1e-10)
    assert int(res.status[-1]) == Status.INFEASIBLE  # 3.0 is far beyond the reach
    ok = np.asarray(res.status) == Status.CONVERGED
    assert np.all(np.diff(np.asarray(res.x)[ok, 0]) >= -1e-9)


def test_sweep_over_beta(small_scores):
    grid = jnp.tile(jnp.array([[0.3, 0.15, -0.5]]), (3, 1))
    betas = jnp.array([0.5, 1.0, 2.0])
    res = sweep_jit(small_scores, grid, betas)
    for i, b in enumerate([0.5, 1.0, 2.0]):
        np.testing.assert_allclose(res.x[i], solve_dual_jit(small_scores, grid[i], b).x, rtol=1e-8, atol=1e-10)
