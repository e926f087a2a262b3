"""Benchmark of the dual solve: our projected Newton vs scipy L-BFGS-B, CVXPY+Clarabel and PyTorch
L-BFGS on the same synthetic problems, in one process; the fused pass against the memory-read roofline; and
`can dual` end to end.

    python benchmarks/dual_bench.py                 # full table (N up to 1e6), CPU
    python benchmarks/dual_bench.py --quick         # a minute
    python benchmarks/dual_bench.py --tag h100      # name the result files after the machine

Writes benchmarks/results/dual_<tag>.md and .json. Timings are medians of repeated runs after a warm-up
(compile time reported separately). Every peer's final λ is judged by the same independent float64 NumPy
KKT residual, max_j |min(λ_j, ∇_j D̂(λ))|.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from can_jax.dual import auto_block, pass_units, to_blocks  # noqa: E402
from can_jax.sim.synthetic import synthetic_scores  # noqa: E402
from can_jax.solve import solve_dual_jit  # noqa: E402

BETA = 1.0
TOL = 1e-9


@dataclass
class Case:
    n: int
    k: int
    m: int
    peers: tuple = ("scipy", "torch")
    reps: int = 3


FULL = [
    Case(1_000, 16, 1, ("scipy", "cvxpy", "torch")),
    Case(1_000, 16, 4, ("scipy", "cvxpy", "torch")),
    Case(10_000, 64, 4),
    Case(100_000, 64, 4),
    Case(100_000, 128, 16, ("scipy",), 2),
    Case(1_000_000, 16, 4, ("scipy",), 2),
    Case(1_000_000, 64, 1, ("scipy",), 1),
]
QUICK = [Case(1_000, 16, 4, ("scipy", "cvxpy", "torch")), Case(20_000, 64, 4)]


def margins_for(m: int) -> np.ndarray:
    # A mix of active and slack constraints: the last is loose whenever m > 1.
    b = np.linspace(0.3, 0.1, m)
    if m > 1:
        b[-1] = -1.0
    return b


# ------------------------------------------------------------------ independent NumPy reference (float64)
class NumpyDual:
    """Vectorised NumPy dual over padded arrays: the objective scipy minimises, and the judge of every peer."""

    def __init__(self, sc, margins, beta):
        self.r = np.asarray(sc.reward)
        self.g = np.asarray(sc.utility)
        self.mask = np.asarray(sc.mask)
        self.k = self.mask.sum(1)
        self.gbar = (self.g.sum(1) / self.k[:, None]).mean(0)
        self.b, self.beta = np.asarray(margins), beta

    def value_grad(self, lam):
        s = np.where(self.mask, (self.r + self.g @ lam) / self.beta, -np.inf)
        top = s.max(1, keepdims=True)
        e = np.exp(s - top)
        z = e.sum(1, keepdims=True)
        w = e / z
        val = self.beta * np.mean(top[:, 0] + np.log(z[:, 0]) - np.log(self.k)) - lam @ (self.gbar + self.b)
        grad = np.einsum("nk,nkj->j", w, self.g) / len(self.k) - self.gbar - self.b
        return val, grad

    def kkt(self, lam):
        return float(np.max(np.abs(np.minimum(lam, self.value_grad(lam)[1]))))


def time_it(fn, reps):
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


# ------------------------------------------------------------------ peers
def run_ours(sc, margins, reps, block):
    b = jnp.asarray(margins)
    t = time.perf_counter()
    res = jax.block_until_ready(solve_dual_jit(sc, b, BETA, tol=TOL, block=block))
    first = time.perf_counter() - t
    res, sec = time_it(lambda: jax.block_until_ready(solve_dual_jit(sc, b, BETA, tol=TOL, block=block)), reps)
    return np.asarray(res.x), sec, {"compile_s": first - sec, "nit": int(res.nit), "nfev": int(res.nfev)}


def run_scipy(ref: NumpyDual, m, reps):
    from scipy.optimize import minimize

    def solve():
        return minimize(
            ref.value_grad,
            np.zeros(m),
            jac=True,
            bounds=[(0, None)] * m,
            method="L-BFGS-B",
            options={"ftol": 0.0, "gtol": TOL, "maxiter": 2000, "maxcor": 20},
        )

    res, sec = time_it(solve, reps)
    return res.x, sec, {"nit": int(res.nit), "nfev": int(res.nfev)}


def run_cvxpy(ref: NumpyDual, m, reps):
    import cvxpy as cp

    def solve():
        lam = cp.Variable(m, nonneg=True)
        rc = ref.r - (ref.r * ref.mask).sum(1, keepdims=True) / ref.k[:, None]
        terms = []
        for i in range(len(ref.k)):
            kk = ref.mask[i]
            terms.append(cp.log_sum_exp((rc[i, kk] + ref.g[i, kk] @ lam) / ref.beta - np.log(ref.k[i])))
        obj = ref.beta * cp.sum(cp.hstack(terms)) / len(ref.k) - lam @ (ref.gbar + ref.b)
        cp.Problem(cp.Minimize(obj)).solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        return np.asarray(lam.value)

    x, sec = time_it(solve, max(1, reps - 2))
    return x, sec, {}


def run_torch(ref: NumpyDual, m, reps):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = torch.tensor(ref.r, dtype=torch.float64, device=dev)
    g = torch.tensor(ref.g, dtype=torch.float64, device=dev)
    mask = torch.tensor(ref.mask, device=dev)
    logk = torch.log(torch.tensor(ref.k, dtype=torch.float64, device=dev))
    c = torch.tensor(ref.gbar + ref.b, dtype=torch.float64, device=dev)

    def solve():
        theta = torch.full((m,), 0.1, dtype=torch.float64, device=dev, requires_grad=True)  # λ = θ² ≥ 0
        opt = torch.optim.LBFGS(
            [theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            lam = theta**2
            s = torch.where(mask, (r + g @ lam) / ref.beta, -torch.inf)
            val = ref.beta * (torch.logsumexp(s, 1) - logk).mean() - lam @ c
            val.backward()
            return val

        opt.step(closure)
        if dev == "cuda":
            torch.cuda.synchronize()
        return (theta**2).detach().cpu().numpy()

    x, sec = time_it(solve, reps)
    return x, sec, {"device": dev}


# ------------------------------------------------------------------ roofline
def memory_bandwidth():
    """Best-of read bandwidth: a 1 GiB float64 reduction with NumPy and with jitted JAX."""
    a = np.ones(1 << 27)
    _, t_np = time_it(lambda: a.sum(), 5)
    x = jnp.asarray(a)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    _, t_jx = time_it(lambda: f(x).block_until_ready(), 5)
    return max(a.nbytes / t_np, x.nbytes / t_jx) / 1e9


def fused_pass(sc, margins, blocks_to_try, reps=5):
    """Median time of one value+gradient+Hessian pass for several block sizes (data blocked beforehand)."""
    out = {}
    b = jnp.asarray(margins)
    lam = jnp.full((sc.utility.shape[-1],), 0.5)
    one_pass = jax.jit(lambda lam, blocked: pass_units(lam, blocked, b, BETA, 2)[0])
    for blk in blocks_to_try:
        blocked = jax.block_until_ready(to_blocks(sc, blk))
        jax.block_until_ready(one_pass(lam, blocked))
        _, sec = time_it(lambda blocked=blocked: jax.block_until_ready(one_pass(lam, blocked)), reps)
        out["one block" if blk is None else str(blk)] = sec
        del blocked
    return out


def cli_end_to_end(sc, margins, tmp: Path):
    """`can dual` as a user runs it: process start to JSON on stdout, cold and warm compile cache."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    mask = np.asarray(sc.mask)
    pid, slot = np.nonzero(mask)
    util = np.asarray(sc.utility)[pid, slot]
    cols = {"prompt_id": pid, "reward": np.asarray(sc.reward)[pid, slot]}
    cols.update({f"u{j}": util[:, j] for j in range(util.shape[1])})
    path = tmp / "scores.parquet"
    pq.write_table(pa.table(cols), path)
    args = [sys.executable, "-m", "train.cli", "dual", str(path), "--reward", "reward", "--beta", str(BETA), "--json"]
    for j, b in enumerate(margins):
        args += ["--constraint", f"u{j}={b}"]
    env = {**os.environ, "CAN_CACHE_DIR": str(tmp / "cache"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    times = {}
    for label in ("cold cache", "warm cache"):
        t = time.perf_counter()
        p = subprocess.run(args, capture_output=True, text=True, env=env)
        times[label] = time.perf_counter() - t
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        lam = np.array(list(json.loads(p.stdout)["lambda"].values()))
    return times, lam, path.stat().st_size


def machine():
    info = {"python": platform.python_version(), "jax": jax.__version__, "jax_backend": jax.default_backend()}
    try:
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        info["cpu"] = f"{cpu[0]} × {len(cpu)} logical cores" if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        mem = [ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")][0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError):
        pass
    if jax.default_backend() == "gpu":
        info["gpu"] = str(jax.devices()[0].device_kind)
    return info


@dataclass
class Row:
    n: int
    k: int
    m: int
    data_mb: float
    results: dict = field(default_factory=dict)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small cases (about a minute)")
    ap.add_argument("--tag", default="cpu", help="suffix of the result files (machine name)")
    ap.add_argument("--no-cli", action="store_true", help="skip the `can dual` end-to-end timing")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    block = "auto"  # ~3 MB blocks on CPU, one big block on GPU
    cases = QUICK if args.quick else FULL
    info = machine()
    print("machine:", info, flush=True)
    bw = memory_bandwidth()
    print(f"memory read bandwidth: {bw:.1f} GB/s", flush=True)
    rows, roofline, cli = [], {}, {}
    for case in cases:
        sc = jax.block_until_ready(synthetic_scores(jax.random.key(0), case.n, case.k, case.m, rho=-0.5))
        margins = margins_for(case.m)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(sc))
        row = Row(case.n, case.k, case.m, round(nbytes / 1e6, 1))
        ref = NumpyDual(sc, margins, BETA)
        x, sec, extra = run_ours(sc, margins, case.reps, block)
        row.results["ours (JAX Newton)"] = {"seconds": sec, "kkt": ref.kkt(x), **extra}
        print(f"N={case.n} K={case.k} m={case.m}: ours {sec:.3f}s kkt={ref.kkt(x):.1e} {extra}", flush=True)
        for peer in case.peers:
            fn = {"scipy": run_scipy, "cvxpy": run_cvxpy, "torch": run_torch}[peer]
            name = {"scipy": "scipy L-BFGS-B", "cvxpy": "CVXPY+Clarabel", "torch": "PyTorch L-BFGS"}[peer]
            try:
                px, psec, pextra = fn(ref, case.m, case.reps)
            except Exception as err:  # a peer that cannot run here is reported, not fatal
                row.results[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
                print(f"  {name}: failed: {err}", flush=True)
                continue
            row.results[name] = {"seconds": psec, "kkt": ref.kkt(px), "max_abs_dlam": float(np.abs(px - x).max()),
                                 **pextra}  # fmt: skip
            print(f"  {name}: {psec:.3f}s kkt={ref.kkt(px):.1e} |Δλ|={np.abs(px - x).max():.1e}", flush=True)
        rows.append(row)
        if (case.n, case.k, case.m) in ((100_000, 64, 4), (20_000, 64, 4)):
            n, k, m = case.n, case.k, case.m
            tries = [auto_block(n, k, m), 250, 1000 if n % 1000 == 0 else None, None]
            passes = fused_pass(sc, margins, list(dict.fromkeys(tries)))
            best = min(passes.values())
            roofline = {"case": f"N={n} K={k} m={m}", "bytes": nbytes, "bandwidth_GBps": bw,
                        "roofline_s": nbytes / (bw * 1e9), "pass_s": passes, "best_pass_s": best,
                        "x_roofline": best / (nbytes / (bw * 1e9))}  # fmt: skip
            print("fused pass:", roofline, flush=True)
            if not args.no_cli:
                with tempfile.TemporaryDirectory() as tmp:
                    times, lam_cli, size = cli_end_to_end(sc, margins, Path(tmp))
                cli = {"case": f"N={n} K={k} m={m}", "parquet_MB": round(size / 1e6, 1), **times,
                       "scipy_solve_s": row.results.get("scipy L-BFGS-B", {}).get("seconds"),
                       "max_abs_dlam_vs_library": float(np.abs(lam_cli - x).max())}  # fmt: skip
                print("can dual end to end:", cli, flush=True)
        del sc, ref
    write(Path(args.out), args.tag, info, rows, roofline, cli)


def write(out: Path, tag: str, info, rows, roofline, cli):
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "beta": BETA, "tol": TOL, "rows": [asdict(r) for r in rows], "roofline": roofline,
               "cli": cli}  # fmt: skip
    (out / f"dual_{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# Dual solve benchmark — {tag}", "", f"Machine: {info}", "",
             f"β = {BETA}, KKT tolerance {TOL:g}; synthetic scores (can_jax.sim.synthetic, ρ = −0.5); margins mix "
             "active and slack constraints. Times are medians after a warm-up; compile time separate. KKT residual of "
             "every peer is measured by the same independent float64 NumPy gradient.", "",
             "| N | K | m | data MB | peer | seconds | KKT residual | speed-up of ours | max abs Δλ vs ours | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ours = r.results["ours (JAX Newton)"]["seconds"]
        for name, v in r.results.items():
            if "error" in v:
                lines.append(f"| {r.n} | {r.k} | {r.m} | {r.data_mb} | {name} | — | — | — | — | {v['error']} |")
                continue
            notes = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()
                              if a not in ("seconds", "kkt", "max_abs_dlam"))  # fmt: skip
            speed = "1" if name.startswith("ours") else f"{v['seconds'] / ours:.1f}×"
            dl = f"{v['max_abs_dlam']:.1e}" if "max_abs_dlam" in v else ""
            lines.append(f"| {r.n} | {r.k} | {r.m} | {r.data_mb} | {name} | {v['seconds']:.4f} | {v['kkt']:.1e} | "
                         f"{speed} | {dl} | {notes} |")  # fmt: skip
    if roofline:
        lines += ["", f"## Fused value + gradient + Hessian pass ({roofline['case']})", "",
                  f"Memory-read bandwidth (best of NumPy/JAX 1 GiB sums): {roofline['bandwidth_GBps']:.1f} GB/s; "
                  f"data {roofline['bytes'] / 1e6:.0f} MB → roofline {roofline['roofline_s'] * 1e3:.1f} ms.", "",
                  "| prompts per block | ms per pass | × roofline |", "|---|---|---|"]  # fmt: skip
        for blk, sec in roofline["pass_s"].items():
            lines.append(f"| {blk} | {sec * 1e3:.1f} | {sec / roofline['roofline_s']:.1f} |")
    if cli:
        lines += ["", f"## `can dual` end to end ({cli['case']}, Parquet {cli['parquet_MB']} MB)", "",
                  "| run | seconds |", "|---|---|",
                  f"| process start → JSON, cold compile cache | {cli['cold cache']:.2f} |",
                  f"| process start → JSON, warm compile cache | {cli['warm cache']:.2f} |"]  # fmt: skip
        if cli.get("scipy_solve_s"):
            lines.append(f"| scipy L-BFGS-B solve alone (in-process, data in memory) | {cli['scipy_solve_s']:.2f} |")
    (out / f"dual_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / f'dual_{tag}.md'}")


if __name__ == "__main__":
    main()
