"""The blocked finite-K jackknife (issue 22) against values recorded from the unblocked implementation it replaced
(tests/can_jax/data/bias_fixture.json, written by make_bias_fixture.py at b4a178a): the same corrected λ,
intervals and gains, on an equal-K and two ragged tables, with several blocks and a padded last block."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from can_jax.bias import finite_k_bias_jit, interval
from can_jax.sim.synthetic import synthetic_scores

CASES = json.loads((Path(__file__).parent / "data" / "bias_fixture.json").read_text())["cases"]


def _arr(values):
    return np.array([np.nan if v is None else v for v in values], float)


@pytest.mark.parametrize("case", CASES, ids=[f"N{c['n']}K{c['k']}m{c['m']}" for c in CASES])
def test_blocked_bias_matches_the_recorded_unblocked_values(case):
    sc = synthetic_scores(jax.random.key(case["seed"]), case["n"], case["k"], case["m"], ragged=case["ragged"])
    lam = jnp.asarray(case["lam_hat"])
    # 7 blocks of 32 prompts for N = 200 (the last padded), 64 for the others: several scan steps either way.
    block = 32 if case["n"] == 200 else 64
    rep = finite_k_bias_jit(lam, sc, jnp.asarray(case["margins"]), case["beta"], block=block)
    assert int(rep.prompts) == case["prompts"]
    assert int(rep.prompts_corrected) == case["prompts_corrected"]
    for name, fields in case["report"].items():
        c = getattr(rep, name)
        lo, hi = interval(c)
        got = {f: np.atleast_1d(np.asarray(getattr(c, f))) for f in c._fields}
        got["interval"] = [np.atleast_1d(np.asarray(lo)), np.atleast_1d(np.asarray(hi))]
        for f, want in fields.items():
            if f == "interval":
                for g, w in zip(got[f], want):
                    np.testing.assert_allclose(g, _arr(w), rtol=1e-9, atol=1e-12, err_msg=f"{name}.{f}")
            else:
                np.testing.assert_allclose(got[f], _arr(want), rtol=1e-9, atol=1e-12, err_msg=f"{name}.{f}")


@pytest.mark.parametrize("beta", [0.7, 1e-3])
def test_closed_form_jacobian_matches_autodiff_and_finite_differences(beta):
    """The pass's Σ_i wt_i ψ_i^J and its Jacobian against forward-mode autodiff through the per-prompt
    `pseudo_values` (checked against brute-force leave-one-out in test_bias.py) and central differences. β = 1e-3
    puts one response at ~all the weight (gaps of thousands in s): the leave-the-heaviest-out sums are taken afresh."""
    from can_jax.bias import _centred, _jack_block
    from tests.can_jax.bias_reference import pseudo_values

    sc = _centred(synthetic_scores(jax.random.key(5), 40, 6, 3, ragged=True))
    sc = sc._replace(weight=jnp.linspace(0.5, 2.0, 40))
    b = jnp.array([0.2, 0.1, 0.05])
    lam = jnp.array([0.8, 0.3, 0.0]) * (1.0 if beta > 0.1 else 0.01)

    def psi_ref(at):
        _, jack, wt = pseudo_values(at, sc, b, beta)
        return wt @ jack[:, :3]

    got = _jack_block(lam, sc, b, beta, False)
    np.testing.assert_allclose(got["psi"], psi_ref(lam), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["jac"], jax.jacfwd(psi_ref)(lam), rtol=1e-8, atol=1e-10)
    h = 1e-6 * (1.0 if beta > 0.1 else 0.001)
    fd = np.stack([(psi_ref(lam + h * e) - psi_ref(lam - h * e)) / (2 * h) for e in np.eye(3)], axis=1)
    np.testing.assert_allclose(got["jac"], fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())
