"""`sweep.solve_many`: P problems vmapped into one call, each against scipy L-BFGS-B on its own NumPy dual."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from can_jax.sim.synthetic import synthetic_scores
from can_jax.sweep import solve_many_jit


def scipy_lambda(r, g, b, beta):
    def f(lam):
        s = (r + g @ lam) / beta
        val = beta * np.mean(logsumexp(s, axis=1) - np.log(r.shape[1])) - lam @ (g.mean(axis=(0, 1)) + b)
        grad = np.einsum("nk,nkj->j", softmax(s, axis=1), g) / r.shape[0] - g.mean(axis=(0, 1)) - b
        return val, grad

    opts = {"ftol": 0.0, "gtol": 1e-12, "maxiter": 5000}
    return minimize(f, np.zeros(len(b)), jac=True, bounds=[(0, None)] * len(b), method="L-BFGS-B", options=opts).x


# "auto" vmaps all 5 small problems at once; 2 scans over chunks of 2 with a remainder of 1 (lax.map's batches).
@pytest.mark.parametrize("batch", ["auto", 2])
def test_batch_of_problems_matches_scipy_one_by_one(batch):
    keys = jax.random.split(jax.random.key(11), 5)
    problems = jax.vmap(lambda k: synthetic_scores(k, 60, 8, 3))(keys)
    margins = jnp.array([[0.3, 0.1, -1.0], [0.2, 0.2, 0.1], [0.0, 0.0, 0.0], [0.4, -1.0, 0.1], [0.1, 0.3, 0.2]])
    betas = jnp.array([1.0, 0.5, 2.0, 1.0, 0.7])
    res = solve_many_jit(problems, margins, betas, batch=batch)
    assert res.x.shape == (5, 3) and bool(jnp.all(res.status == 0))
    for i in range(5):
        want = scipy_lambda(
            np.asarray(problems.reward[i]), np.asarray(problems.utility[i]), np.asarray(margins[i]), float(betas[i])
        )
        np.testing.assert_allclose(res.x[i], want, atol=2e-6)
