"""PeCAN (issue #5, dual part): with exact pre-aligned policies, its λ* equals MoCAN's."""

import jax
import jax.numpy as jnp
import numpy as np

from can_jax.inference import standard_errors
from can_jax.pecan import pecan_scores
from can_jax.result import Status
from can_jax.scores import Scores
from can_jax.sim.worlds import exact_scores, make_world, prealigned, sample_scores
from can_jax.solve import solve_dual_jit

BETA, BETA_R, BETA_G = 1.0, 0.5, jnp.array([0.3, 2.0])


def _world():
    return make_world(jax.random.key(11), 400, 10, 2)


def test_exact_pecan_lambda_equals_mocan():
    w = _world()
    mocan = solve_dual_jit(exact_scores(w), w.margins, BETA)
    pa = prealigned(w, BETA_R, BETA_G)
    sc = pecan_scores(pa.logratio_reward, pa.logratio_utility, BETA_R, BETA_G, kl_ref=pa.kl_ref)
    sc = sc._replace(log_prior=w.log_ref)  # exact expectations over the whole response set
    pecan = solve_dual_jit(sc, w.margins, BETA)
    assert mocan.status == pecan.status == Status.CONVERGED
    np.testing.assert_allclose(pecan.x, mocan.x, rtol=1e-8, atol=1e-10)


def test_sampled_pecan_equals_sampled_mocan_and_kl_reference_is_consistent():
    w = _world()
    smp = sample_scores(jax.random.key(12), w, 16)
    mocan = solve_dual_jit(smp.scores, w.margins, BETA)
    pa = prealigned(w, BETA_R, BETA_G)
    lr = jnp.take_along_axis(pa.logratio_reward, smp.index, axis=1)
    lg = jnp.take_along_axis(pa.logratio_utility, smp.index[..., None], axis=1)
    # Sample-mean reference: r̃, g̃ differ from r, g by per-prompt constants only, so λ̂ is identical.
    plain = solve_dual_jit(pecan_scores(lr, lg, BETA_R, BETA_G), w.margins, BETA)
    np.testing.assert_allclose(plain.x, mocan.x, rtol=1e-8, atol=1e-10)
    # KL reference: a different (lower-variance) estimate of E_ref[g̃|x]; λ̂ stays within sampling error of λ*.
    sc: Scores = pecan_scores(lr, lg, BETA_R, BETA_G, kl_ref=pa.kl_ref)
    kl_res = solve_dual_jit(sc, w.margins, BETA)
    exact = solve_dual_jit(exact_scores(w), w.margins, BETA)
    se = np.asarray(standard_errors(kl_res, sc, w.margins, BETA))
    active = np.asarray(exact.x) > 0
    assert np.all(np.abs(np.asarray(kl_res.x) - np.asarray(exact.x))[active] < 4 * se[active] + 0.05)
