import jax
import jax.numpy as jnp
import numpy as np

from can_jax.inference import bootstrap, standard_errors
from can_jax.result import Status
from can_jax.sim.synthetic import synthetic_scores
from can_jax.solve import solve_dual_jit

MARGINS = jnp.array([0.3, 0.1, -2.0])  # two active, one slack


_make = jax.jit(synthetic_scores, static_argnums=(1, 2, 3))
_se = jax.jit(standard_errors)


def _solve(key, n):
    sc = _make(key, n, 8, 3, -0.5)
    return sc, solve_dual_jit(sc, MARGINS, 1.0)


def test_sandwich_se_matches_monte_carlo_spread():
    """The sandwich SE is checked against the actual spread of λ̂* over independent datasets."""
    n, reps = 1500, 60
    keys = jax.random.split(jax.random.key(0), reps)
    lams, ses = [], []
    for k in keys:
        sc, res = _solve(k, n)
        assert res.status == Status.CONVERGED
        lams.append(np.asarray(res.x))
        ses.append(np.asarray(_se(res, sc, MARGINS, 1.0)))
    lams, ses = np.array(lams), np.array(ses)
    mc_sd = lams[:, :2].std(axis=0, ddof=1)
    mean_se = ses[:, :2].mean(axis=0)
    # With 60 replicates the MC standard deviation itself is uncertain by ~9%: allow 30%.
    np.testing.assert_allclose(mean_se, mc_sd, rtol=0.3)
    assert np.all(np.isnan(ses[:, 2]))  # boundary constraint: no normal approximation


def test_sandwich_se_matches_prompt_bootstrap():
    sc, res = _solve(jax.random.key(1), 3000)
    se = np.asarray(standard_errors(res, sc, MARGINS, 1.0))
    boot = bootstrap(jax.random.key(2), sc, MARGINS, 1.0, n_boot=120, lam0=res.x)
    assert int(boot.failed) == 0
    boot = np.asarray(boot.x)
    np.testing.assert_allclose(boot[:, :2].std(axis=0, ddof=1), se[:2], rtol=0.25)
    # The bootstrap centre sits on the estimate.
    assert np.all(np.abs(boot[:, :2].mean(axis=0) - res.x[:2]) < 0.3 * se[:2])
