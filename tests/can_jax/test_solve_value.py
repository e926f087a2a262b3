"""The solver's reported D̂(λ*) (`fun`) against a plain NumPy evaluation of the dual, on scores with large
per-prompt offsets and ragged K (each pass shifts prompts on the fly; the value must come back unshifted)."""

import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from can_jax.scores import from_long
from can_jax.solve import solve_dual_jit


def test_reported_value_is_the_dual_value_of_the_data_as_given():
    rng = np.random.default_rng(3)
    counts = rng.integers(2, 9, 200)
    idx = np.repeat(np.arange(200), counts)
    h = rng.normal(size=len(idx))
    r = 1e4 + 3 * h + rng.normal(size=len(idx)) + 50 * rng.normal(size=200)[idx]
    g = -0.5 * h[:, None] + rng.normal(size=(len(idx), 2)) + 30 * rng.normal(size=(200, 2))[idx]
    beta, b = 0.8, np.array([0.3, 0.1])
    res = solve_dual_jit(from_long(idx, r, g), jnp.asarray(b), beta)
    lam = np.asarray(res.x)
    terms = []
    for i in range(200):
        ri, gi = r[idx == i], g[idx == i]
        terms.append(beta * (logsumexp((ri + gi @ lam) / beta) - np.log(len(ri))) - lam @ (gi.mean(axis=0) + b))
    assert int(res.status) == 0
    np.testing.assert_allclose(float(res.fun), np.mean(terms), rtol=1e-12)
