"""The peer of `can dual`, what a user would write instead: scipy L-BFGS-B on the dual of a Parquet table.
usage: python benchmarks/scipy_dual.py TABLE REWARD BETA COL=MARGIN [COL=MARGIN ...]"""

import sys

import numpy as np
import pyarrow.parquet as pq
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

path, reward, beta, specs = sys.argv[1], sys.argv[2], float(sys.argv[3]), [a.split("=") for a in sys.argv[4:]]
t = pq.read_table(path, columns=["prompt_id", reward] + [c for c, _ in specs]).sort_by("prompt_id")
_, counts = np.unique(t["prompt_id"].to_numpy(), return_counts=True)
n, k = len(counts), int(counts[0])
assert (counts == k).all(), "this script handles equal responses per prompt only"
r = t[reward].to_numpy().reshape(n, k).astype(float)
g = np.stack([t[c].to_numpy().astype(float) for c, _ in specs], axis=-1).reshape(n, k, -1)
b = np.array([float(v) for _, v in specs])
gbar = g.mean(axis=(0, 1))


def dual(lam):
    s = (r + g @ lam) / beta
    val = beta * np.mean(logsumexp(s, axis=1) - np.log(k)) - lam @ (gbar + b)
    return val, np.einsum("nk,nkj->j", softmax(s, axis=1), g) / n - gbar - b


res = minimize(dual, np.zeros(len(b)), jac=True, bounds=[(0, None)] * len(b), method="L-BFGS-B",
               options={"ftol": 0.0, "gtol": 1e-9, "maxiter": 2000})  # fmt: skip
print("lambda", " ".join(f"{x:.10g}" for x in res.x), "nit", res.nit)
