"""Records `can_jax.bias.finite_k_bias` outputs on fixed synthetic tables (issue 22): the blocked jackknife must give
the same corrected λ, intervals and gains as the implementation this was recorded from (commit b4a178a, the
unblocked closed-form leave-one-out over all N·K·(m + 2) at once).

    .venv/bin/python tests/can_jax/data/make_bias_fixture.py      # rewrites bias_fixture.json (do not, normally)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from can_jax.bias import finite_k_bias, interval  # noqa: E402
from can_jax.sim.synthetic import synthetic_scores  # noqa: E402
from can_jax.solve import solve_dual  # noqa: E402

# (seed, N, K, m, ragged, margins, beta)
CASES = [
    (0, 200, 8, 2, False, [0.3, 0.1], 1.0),
    (1, 300, 12, 3, True, [0.3, 0.15, -2.0], 0.7),
    (2, 150, 5, 1, True, [0.25], 1.5),
]


def _list(x):
    return [None if not np.isfinite(v) else float(v) for v in np.atleast_1d(np.asarray(x, float))]


def record():
    out = []
    for seed, n, k, m, ragged, margins, beta in CASES:
        sc = synthetic_scores(jax.random.key(seed), n, k, m, ragged=ragged)
        lam = solve_dual(sc, jnp.asarray(margins), beta).x
        rep = finite_k_bias(lam, sc, jnp.asarray(margins), beta)
        fields = {}
        for name in ("lam", "utility_gain", "reward_gain", "kl"):
            c = getattr(rep, name)
            fields[name] = {f: _list(getattr(c, f)) for f in c._fields}
            lo, hi = interval(c)
            fields[name]["interval"] = [_list(lo), _list(hi)]
        case = dict(seed=seed, n=n, k=k, m=m, ragged=ragged, margins=margins, beta=beta, lam_hat=_list(lam))
        out.append(dict(case, prompts=int(rep.prompts), prompts_corrected=int(rep.prompts_corrected), report=fields))
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("bias_fixture.json")
    path.write_text(json.dumps({"recorded_from": "can_jax.bias at b4a178a (unblocked)", "cases": record()}, indent=1))
    print("wrote", path)
