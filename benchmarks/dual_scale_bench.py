"""In-process dual benchmarks: solve and finite-K bias against scipy L-BFGS-B, passes against the
memory-read roofline, a scaling table in N, and many small problems vmapped against a scipy loop.

    python benchmarks/dual_scale_bench.py                       # everything (about 15 min on 2 cores)
    python benchmarks/dual_scale_bench.py --only inproc,batch   # some sections
    python benchmarks/dual_scale_bench.py --scale-max 1000000   # stop the scaling table earlier

Writes benchmarks/results/dual_scale_<tag>.md and .json. Times are medians of repeated runs after a warm-up
(compile separate); every peer runs in the same process and the same run. The scaling table runs each N in its
own subprocess and reads its peak resident set (resource.getrusage). Every λ is judged by one independent NumPy
KKT residual (benchmarks/dual_bench.py's `NumpyDual`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import can_jax.solve as solve_module  # noqa: E402
from benchmarks.dual_bench import NumpyDual, machine, memory_bandwidth, run_scipy  # noqa: E402
from can_jax.bias import finite_k_bias_jit, packed_block_pass  # noqa: E402
from can_jax.dual import pass_units, to_blocks  # noqa: E402
from can_jax.packed import fast_jit, pack, packed_pass  # noqa: E402
from can_jax.result import Status  # noqa: E402
from can_jax.sim.synthetic import synthetic_scores  # noqa: E402
from can_jax.solve import solve_dual_jit  # noqa: E402
from can_jax.sweep import problems_per_step, solve_many_jit  # noqa: E402

ALL = ("inproc", "roofline", "scaling", "batch")
pack_jit = fast_jit(pack, static_argnames=("block", "dtype"))
BETA = 1.0
MARGINS = np.array([0.3, 0.25, 0.2, -1.0])


def median_time(fn, reps):
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compile_and_run(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def inproc(n=100_000, k=64, reps=5):
    """Solve and bias in process against scipy L-BFGS-B (the same NumPy dual the scipy script minimises)."""
    sc = jax.block_until_ready(synthetic_scores(jax.random.key(0), n, k, 4))
    b = jnp.asarray(MARGINS)
    res, first_solve = compile_and_run(lambda: solve_dual_jit(sc, b, BETA))
    t_solve = median_time(lambda: solve_dual_jit(sc, b, BETA), reps)
    # The same solve on scores already in the CPU pass's layout (as a table reader builds them from its columns).
    packed = jax.block_until_ready(pack_jit(sc))
    t_pack = median_time(lambda: pack_jit(sc), reps)
    res_p = jax.block_until_ready(solve_dual_jit(packed, b, BETA))
    t_solve_packed = median_time(lambda: solve_dual_jit(packed, b, BETA), reps)
    # λ from the [N, K, m] pass the packed one replaces on CPU (another static argument: traced without packing).
    packable, solve_module.packable = solve_module.packable, lambda *a, **kw: False
    res_blocked = solve_dual_jit.plain(sc, b, BETA, max_iter=99)
    solve_module.packable = packable
    _, first_bias = compile_and_run(lambda: finite_k_bias_jit(res.x, sc, b, BETA))
    t_bias = median_time(lambda: finite_k_bias_jit(res.x, sc, b, BETA), reps)
    ref = NumpyDual(sc, MARGINS, BETA)
    x_scipy, t_scipy, extra = run_scipy(ref, 4, 3)
    out = {"n": n, "k": k, "m": 4, "solve_s": t_solve, "solve_compile_s": first_solve - t_solve,
           "solve_packed_s": t_solve_packed, "pack_s": t_pack,
           "max_rel_dlambda_packed": float(np.max(np.abs(np.asarray(res_p.x) - np.asarray(res_blocked.x))
                                               / np.maximum(np.abs(np.asarray(res_blocked.x)), 1e-300))),
           "bias_s": t_bias, "bias_compile_s": first_bias - t_bias, "scipy_s": t_scipy, "scipy_nit": extra["nit"],
           "kkt_ours": ref.kkt(np.asarray(res.x)), "kkt_scipy": ref.kkt(x_scipy), "nit": int(res.nit),
           "nfev": int(res.nfev), "max_abs_dlambda": float(np.max(np.abs(np.asarray(res.x) - x_scipy)))}  # fmt: skip
    print("inproc", out, flush=True)
    return out


def roofline(n=100_000, k=64, reps=7):
    """Each kind of pass, as the solver and the bias run them, against one read of that pass's own inputs."""
    bw = memory_bandwidth()
    sc = jax.block_until_ready(synthetic_scores(jax.random.key(0), n, k, 4))
    b = jnp.asarray(MARGINS)
    lam = jnp.full((4,), 0.5)
    blocks = jax.block_until_ready(to_blocks(sc))
    packed = jax.block_until_ready(pack_jit(sc))
    bias1 = fast_jit(lambda lam, pk: packed_block_pass(lam, pk, b, BETA, True))
    bias0 = fast_jit(lambda lam, pk: packed_block_pass(lam, pk, b, BETA, False))
    p2 = fast_jit(lambda lam, pk: packed_pass(lam, pk, b, BETA, 2))
    pred = fast_jit(lambda lam, pk: packed_pass(lam, pk, b, BETA, 1))
    old2 = jax.jit(lambda lam, bl: pass_units(lam, bl, b, BETA, 2, predict=True, centre=True)[0])
    # The exp alone: one exp per score of a stored [N, K] array, summed (the read of that array included).
    exp_only = fast_jit(lambda r: jnp.sum(jnp.exp(r - 30.0)))
    table = sum(x.nbytes for x in jax.tree.leaves(blocks))
    size = sum(x.nbytes for x in jax.tree.leaves(packed))
    rows = [  # (name, seconds, bytes the pass reads)
        ("exp alone, one per score (the floor of the exp)", median_time(lambda: exp_only(sc.reward), reps),
         sc.reward.nbytes),
        ("packing [N, K, m] scores (once per solve on Scores; a table reader builds the layout itself)",
         median_time(lambda: pack_jit(sc), reps), table),
        ("value, gradient, Hessian, predicted outcome (every solver pass: first, Newton, final)",
         median_time(lambda: p2(lam, packed), reps), size),
        ("value, gradient, predicted outcome (certificates' predicted outcome)",
         median_time(lambda: pred(lam, packed), reps), size),
        ("the [N, K, m] pass it replaces on CPU (value, gradient, Hessian, predicted outcome)",
         median_time(lambda: old2(lam, blocks), reps), table),
        ("finite-K bias, first pass (θ, θ^J moments, Jacobian)", median_time(lambda: bias1(lam, packed), reps), size),
        ("finite-K bias, Newton step pass", median_time(lambda: bias0(lam, packed), reps), size),
    ]  # fmt: skip
    passes = {name: {"s": sec, "bytes": nb, "roofline_s": nb / bw / 1e9} for name, sec, nb in rows}
    out = {"n": n, "k": k, "bandwidth_gbs": bw, "bytes": table, "packed_bytes": size, "passes": passes}
    print("roofline", out, flush=True)
    return out


SCALE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from can_jax.bias import finite_k_bias_jit
from can_jax.sim.synthetic import synthetic_scores
from can_jax.solve import solve_dual_jit
n, k = int(sys.argv[1]), int(sys.argv[2])
sc = jax.block_until_ready(synthetic_scores(jax.random.key(0), n, k, 4))
def hwm():  # this process's peak resident set (VmHWM restarts at exec; ru_maxrss would keep the parent's)
    line = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0]
    return int(line.split()[1]) / 2**20
after_data = hwm()
b = jnp.array([0.3, 0.25, 0.2, -1.0])
res = jax.block_until_ready(solve_dual_jit(sc, b, 1.0))
t = time.perf_counter(); res = jax.block_until_ready(solve_dual_jit(sc, b, 1.0)); solve = time.perf_counter() - t
after_solve = hwm()
jax.block_until_ready(finite_k_bias_jit(res.x, sc, b, 1.0))
t = time.perf_counter(); jax.block_until_ready(finite_k_bias_jit(res.x, sc, b, 1.0)); bias = time.perf_counter() - t
peak = hwm()
print(json.dumps({"n": n, "k": k, "table_gb": sum(x.nbytes for x in jax.tree.leaves(sc)) / 2**30,
                  "solve_s": solve, "bias_s": bias, "status": int(res.status), "rss_after_data_gb": after_data,
                  "rss_after_solve_gb": after_solve, "peak_gb": peak}))
"""


def scaling(sizes, k=64, limit_gb=24.0):
    """Each N in a fresh process: time of a compiled solve and bias, and the process's peak memory."""
    rows = []
    for n in sizes:
        table_gb = n * k * 5 * 8 / 2**30
        if 3.5 * table_gb + 1.0 > limit_gb:  # the table, its centred copy and generation temporaries
            rows.append({"n": n, "k": k, "skipped": f"needs ~{3.5 * table_gb + 1:.0f} GB of {limit_gb:.0f}"})
            continue
        p = subprocess.run([sys.executable, "-c", SCALE_CHILD, str(n), str(k), str(ROOT)], capture_output=True,
                           text=True)  # fmt: skip
        if p.returncode != 0:
            rows.append({"n": n, "k": k, "failed": p.stderr[-500:]})
        else:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print("scale", rows[-1], flush=True)
    return rows


def batch(problems=1000, n=1000, k=16, scipy_problems=100, reps=3):
    """Many small problems: one vmapped compiled call against scipy L-BFGS-B one problem at a time."""
    keys = jax.random.split(jax.random.key(1), problems)
    scs = jax.block_until_ready(jax.vmap(lambda key: synthetic_scores(key, n, k, 4))(keys))
    b = jnp.asarray(MARGINS)
    res, first = compile_and_run(lambda: solve_many_jit(scs, b, BETA))
    t_ours = median_time(lambda: solve_many_jit(scs, b, BETA), reps)
    jax.block_until_ready(solve_many_jit(scs, b, BETA, batch=None))
    t_all = median_time(lambda: solve_many_jit(scs, b, BETA, batch=None), reps)
    lam = np.asarray(res.x)
    kkt, dl, t_scipy = [], [], []
    for i in range(scipy_problems):
        one = jax.tree.map(lambda x, i=i: x[i], scs)
        ref = NumpyDual(one, MARGINS, BETA)
        x, sec, _ = run_scipy(ref, 4, 1)
        t_scipy.append(sec)
        kkt.append(ref.kkt(lam[i]))
        dl.append(float(np.max(np.abs(lam[i] - x))))
    per_scipy = statistics.mean(t_scipy)
    out = {"problems": problems, "n": n, "k": k, "ours_s": t_ours, "ours_compile_s": first - t_ours,
           "ours_solves_per_s": problems / t_ours, "per_step": problems_per_step(n, k, 4),
           "all_vmapped_solves_per_s": problems / t_all, "scipy_problems_timed": scipy_problems,
           "scipy_solves_per_s": 1.0 / per_scipy, "speedup": (problems / t_ours) * per_scipy,
           "converged": int(np.sum(np.asarray(res.status) == Status.CONVERGED)), "max_kkt_ours": max(kkt),
           "mean_passes": float(np.mean(np.asarray(res.nfev))), "bytes": sum(x.nbytes for x in jax.tree.leaves(scs)),
           "max_abs_dlambda_vs_scipy": max(dl)}  # fmt: skip
    print("batch", out, flush=True)
    return out


def targets(payload: dict) -> list[str]:
    """The in-process targets against this run's numbers: met or by how much not."""
    if not {"inproc", "roofline", "batch"} <= payload.keys():
        return []
    r, p, b = payload["inproc"], payload["roofline"], payload["batch"]

    def verdict(ok, short):
        return "met" if ok else f"not met ({short})"

    lines = ["## The targets against this run", "",
             "| target | measured | verdict |", "|---|---|---|"]  # fmt: skip
    for name, row in p["passes"].items():
        if name.startswith(("exp alone", "packing", "the [N, K, m] pass")):
            continue
        ratio = row["s"] / row["roofline_s"]
        lines.append(f"| {name.split(' (')[0]}: ≤ 3× the read of its inputs | {ratio:.1f}× | "
                     f"{verdict(ratio <= 3.0, f'{ratio / 3.0:.1f}× over')} |")  # fmt: skip
    for what, sec in (("on packed scores", r["solve_packed_s"]), ("on [N, K, m] Scores (packing included)",
                                                                   r["solve_s"])):  # fmt: skip
        x = r["scipy_s"] / sec
        short = f"{10 / x:.1f}× short"
        lines.append(f"| compiled solve {what} ≥ 10× scipy L-BFGS-B | {x:.1f}× | {verdict(x >= 10, short)} |")
    bias = r["bias_s"] / r["solve_s"]
    lines.append(f"| bias ≤ 1 solve (on Scores) | {bias:.1f} solves | {verdict(bias <= 1.0, f'{bias:.1f}×')} |")
    short = f"{50 / b['speedup']:.0f}× short"
    lines.append(f"| 1,000 small problems ≥ 50× the scipy loop | {b['speedup']:.1f}× | "
                 f"{verdict(b['speedup'] >= 50, short)} |")  # fmt: skip
    lines.append("")
    return lines


def write(out_dir: Path, tag: str, payload: dict):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"dual_scale_{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# Dual at scale — {tag}", "", f"Machine: {payload['machine']}", "",
             "β = 1, margins (0.3, 0.25, 0.2, −1), synthetic scores (can_jax.sim.synthetic), float64. Medians after a "
             "warm-up; compile separate; peers measured in the same run.", ""]  # fmt: skip
    if "inproc" in payload:
        r = payload["inproc"]
        lines += [f"## In process, N = {r['n']:,} × K = {r['k']} × m = 4", "",
                  "| run | seconds | vs scipy | KKT residual (NumPy) |", "|---|---|---|---|",
                  f"| solve_dual_jit on [N, K, m] Scores (packs them first) | {r['solve_s']:.3f} | "
                  f"{r['scipy_s'] / r['solve_s']:.1f}× | {r['kkt_ours']:.1e} |",
                  f"| solve_dual_jit on packed scores | {r['solve_packed_s']:.3f} | "
                  f"{r['scipy_s'] / r['solve_packed_s']:.1f}× | |",
                  f"| (packing alone) | {r['pack_s']:.3f} | | |",
                  f"| finite_k_bias_jit | {r['bias_s']:.3f} | | |",
                  f"| solve + bias | {r['solve_s'] + r['bias_s']:.3f} | "
                  f"{r['scipy_s'] / (r['solve_s'] + r['bias_s']):.1f}× | |",
                  f"| scipy L-BFGS-B (value + gradient, NumPy) | {r['scipy_s']:.3f} | 1× | {r['kkt_scipy']:.1e} |", "",
                  f"Newton iterations {r['nit']}, passes {r['nfev']}; max |Δλ| vs scipy {r['max_abs_dlambda']:.1e}; "
                  f"max relative |Δλ| packed vs the [N, K, m] pass {r['max_rel_dlambda_packed']:.1e}; "
                  f"compile: solve {r['solve_compile_s']:.1f} s, bias {r['bias_compile_s']:.1f} s.", ""]  # fmt: skip
    if "roofline" in payload:
        r = payload["roofline"]
        lines += ["## Passes vs the memory-read roofline", "",
                  f"Measured read bandwidth {r['bandwidth_gbs']:.1f} GB/s (benchmarks/dual_bench.py "
                  "`memory_bandwidth`). Each pass against one read of its own inputs: the [N, K, m] blocks "
                  f"({r['bytes'] / 1e6:.0f} MB) or the packed scores ({r['packed_bytes'] / 1e6:.0f} MB).", "",
                  "| pass | ms | MB read | × its roofline |", "|---|---|---|---|"]  # fmt: skip
        for name, row in r["passes"].items():
            lines.append(f"| {name} | {row['s'] * 1e3:.1f} | {row['bytes'] / 1e6:.0f} | "
                         f"{row['s'] / row['roofline_s']:.1f} |")  # fmt: skip
        lines.append("")
    if "scaling" in payload:
        lines += ["## Scaling in N (K = 64, m = 4), each N in its own process", "",
                  "| N | table GB | solve s | bias s | peak RSS GB | status |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in payload["scaling"]:
            if "solve_s" in r:
                lines.append(f"| {r['n']:,} | {r['table_gb']:.2f} | {r['solve_s']:.3f} | {r['bias_s']:.3f} | "
                             f"{r['peak_gb']:.2f} | {r['status']} |")  # fmt: skip
            else:
                lines.append(f"| {r['n']:,} | | | | | {r.get('skipped') or 'failed'} |")
        done = [r for r in payload["scaling"] if "solve_s" in r]
        if done and all(r["peak_gb"] <= r["rss_after_data_gb"] + 0.25 for r in done[1:]):
            lines += ["", "The peak is reached while the synthetic table is generated (its JAX temporaries): after "
                      "the data exist, the solve and the bias add no table-sized memory (RSS after generation = "
                      "peak, within 0.25 GB, from N = 100,000 on)."]  # fmt: skip
        lines.append("")
    if "batch" in payload:
        r = payload["batch"]
        lines += [f"## {r['problems']:,} problems of N = {r['n']:,} × K = {r['k']} × m = 4", "",
                  "| run | solves / s | speed-up |", "|---|---|---|",
                  f"| solve_many_jit (one call: a scan over chunks of {r['per_step']} problems, vmapped within) | "
                  f"{r['ours_solves_per_s']:.0f} | {r['speedup']:.1f}× |",
                  f"| solve_many_jit(batch=None): all {r['problems']:,} vmapped at once | "
                  f"{r['all_vmapped_solves_per_s']:.0f} | "
                  f"{r['all_vmapped_solves_per_s'] / r['scipy_solves_per_s']:.1f}× |",
                  f"| scipy L-BFGS-B loop ({r['scipy_problems_timed']} problems timed) | "
                  f"{r['scipy_solves_per_s']:.1f} | 1× |",
                  "", f"Converged {r['converged']} / {r['problems']}; worst KKT residual {r['max_kkt_ours']:.1e}; "
                  f"max |Δλ| vs scipy {r['max_abs_dlambda_vs_scipy']:.1e}; "
                  f"compile {r['ours_compile_s']:.1f} s.", ""]  # fmt: skip
    lines += targets(payload)
    (out_dir / f"dual_scale_{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL))
    ap.add_argument("--tag", default="cpu-2core")
    ap.add_argument("--scale-max", type=int, default=2_000_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    previous = Path(args.out) / f"dual_scale_{args.tag}.json"
    # Sections not run this time keep their last results (each section's peers are measured in its own run).
    payload = json.loads(previous.read_text()) if previous.exists() and only != set(ALL) else {}
    payload.update({"machine": str(machine()), "jax": jax.__version__})
    if "inproc" in only:
        payload["inproc"] = inproc()
    if "roofline" in only:
        payload["roofline"] = roofline()
    if "scaling" in only:
        sizes = [n for n in (10_000, 100_000, 250_000, 500_000, 1_000_000, 2_000_000) if n <= args.scale_max]
        payload["scaling"] = scaling(sizes)
    if "batch" in only:
        payload["batch"] = batch()
    payload["peak_rss_gb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write(Path(args.out), args.tag, payload)


if __name__ == "__main__":
    main()
