"""An independent NumPy/scipy implementation of the empirical dual (DESIGN §2), one prompt at a time.

Written from the formulas, sharing no code with can_jax: the tests compare the JAX core against it.
"""

import warnings

import numpy as np
from scipy.special import logsumexp, softmax


def ref_gbar(groups):
    return np.mean([g.mean(axis=0) for _, g in groups], axis=0)


def ref_value(lam, groups, margins, beta):
    lam = np.asarray(lam, float)
    total = 0.0
    for r, g in groups:
        total += beta * (logsumexp((r + g @ lam) / beta) - np.log(len(r)))
    return total / len(groups) - lam @ (ref_gbar(groups) + margins)


def ref_grad(lam, groups, margins, beta):
    acc = 0.0
    for r, g in groups:
        w = softmax((r + g @ lam) / beta)
        acc = acc + w @ g
    return acc / len(groups) - ref_gbar(groups) - margins


def ref_hess(lam, groups, margins, beta):
    acc = 0.0
    for r, g in groups:
        w = softmax((r + g @ lam) / beta)
        acc = acc + np.cov(g.T, aweights=w, bias=True).reshape(g.shape[1], g.shape[1])
    return acc / (beta * len(groups))


def ref_solve_lbfgsb(groups, margins, beta, tol=1e-14):
    """scipy L-BFGS-B on the same dual with λ ≥ 0: an independent solver."""
    from scipy.optimize import minimize

    m = groups[0][1].shape[1]
    res = minimize(
        ref_value,
        np.zeros(m),
        args=(groups, margins, beta),
        jac=ref_grad,
        bounds=[(0, None)] * m,
        method="L-BFGS-B",
        options={"ftol": tol, "gtol": tol, "maxiter": 10_000, "maxcor": 30},
    )
    return res.x


def ref_solve_cvxpy(groups, margins, beta):
    """CVXPY + Clarabel at tight tolerances (DESIGN §6: defaults agree only to ~1e-6)."""
    import cvxpy as cp

    m = groups[0][1].shape[1]
    lam = cp.Variable(m, nonneg=True)
    # Shifting r by its per-prompt mean changes D̂ by a constant only, and keeps the exponential cones
    # well scaled (with r ≈ 20 Clarabel reports an inaccurate solution).
    terms = [cp.log_sum_exp((r - r.mean() + g @ lam) / beta - np.log(len(r))) for r, g in groups]
    obj = beta * cp.sum(cp.hstack(terms)) / len(groups) - lam @ (ref_gbar(groups) + margins)
    prob = cp.Problem(cp.Minimize(obj))
    with warnings.catch_warnings():  # at 1e-12 Clarabel often flags "inaccurate" yet agrees to ~1e-7
        warnings.simplefilter("ignore")
        prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, max_iter=500)
    return np.asarray(lam.value)


def ref_predicted(lam, groups, beta):
    """Reward gain, utility gains and KL(π_λ‖π_ref) on the samples, from explicit per-prompt weights."""
    rg, ug, kl = 0.0, 0.0, 0.0
    for r, g in groups:
        w = softmax((r + g @ lam) / beta)
        k = len(r)
        rg += w @ r - r.mean()
        ug = ug + w @ g - g.mean(axis=0)
        kl += np.sum(w * np.log(np.maximum(w * k, 1e-300)))
    n = len(groups)
    return rg / n, ug / n, kl / n
