"""`can dual` end to end against the scipy script a user would write instead, whole processes.

    python benchmarks/dual_e2e.py                  # N = 100,000 × K = 64 × m = 4
    python benchmarks/dual_e2e.py --n 20000        # smaller

Writes the table once as Parquet (float64 columns, grouped by prompt), then times, each as a fresh process:
`python -m train.cli dual TABLE --reward reward --constraint uJ=b ... --beta 1 --out CERT` with default options
(the cold first run, then two consecutive runs: best of 2) and benchmarks/scipy_dual.py on the same file (cold, then
best of 2). Peak memory is each process's maximum resident set (/usr/bin/time -v). Results go to
benchmarks/results/dual_e2e_<tag>.md and .json, numbers as measured, with the targets: ≥ 1.5× the scipy script,
≤ 1.5 GB, and everything after importing JAX and reading the table ≤ 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MARGINS = [0.3, 0.25, 0.2, -1.0]
BETA = 1.0


def make_table(path: Path, n: int, k: int, m: int, seed: int = 0) -> None:
    """The synthetic scores of benchmarks/dual_bench.py's shape (can_jax.sim.synthetic's model, in NumPy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, k))
    rhos = -0.5 * (1.0 - np.arange(m) / (2 * m))
    off = rng.normal(size=(n, 1 + m))
    cols = {"prompt_id": np.repeat(np.arange(n, dtype=np.int64), k)}
    cols["reward"] = (20 + 3 * h + 0.5 * rng.normal(size=(n, k)) + 4 * off[:, :1]).reshape(-1)
    for j in range(m):
        u = rhos[j] * h + np.sqrt(1 - rhos[j] ** 2) * rng.normal(size=(n, k)) + off[:, 1 + j : 2 + j]
        cols[f"u{j}"] = u.reshape(-1)
    pq.write_table(pa.table(cols), path)


def timed(cmd: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (GB) of one process, with its last stdout line."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-4000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return {"seconds": wall, "peak_gb": rss / 2**20, "stdout": p.stdout.strip().splitlines()[-1:]}


def floor_commands(table: Path) -> dict[str, list[str]]:
    """Processes that do only part of the job: what no `can dual` built on JAX and pyarrow can go below."""
    cols = ["prompt_id", "reward"] + [f"u{j}" for j in range(len(MARGINS))]
    read = f"import pyarrow.parquet as pq; pq.read_table({str(table)!r}, columns={cols!r})"
    jax_op = "import jax; jax.numpy.zeros(1).block_until_ready()"
    return {
        "python start": [sys.executable, "-c", "pass"],
        "import jax, one op on its CPU backend": [sys.executable, "-c", jax_op],
        "read the table's columns (pyarrow)": [sys.executable, "-c", read],
        "both: import jax and read the table": [sys.executable, "-c", f"{jax_op}; {read}"],
    }


def machine() -> str:
    cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    mem = [ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal")][0].split()[1]
    return f"{cpu[0]} × {len(cpu)} logical cores, {int(mem) / 2**20:.1f} GiB, Python {platform.python_version()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tag", default="cpu-2core")
    ap.add_argument("--table", default=None, help="reuse/write the Parquet table here (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    m = len(MARGINS)
    tmp = Path(tempfile.mkdtemp(prefix="dual_e2e_"))
    table = Path(args.table) if args.table else tmp / "scores.parquet"
    if not table.exists():
        make_table(table, args.n, args.k, m)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAN_CACHE_DIR": str(tmp / "cache")}
    can = [sys.executable, "-m", "train.cli", "dual", str(table), "--reward", "reward", "--beta", str(BETA)]
    for j, b in enumerate(MARGINS):
        can += ["--constraint", f"u{j}={b}"]
    can += ["--out", str(tmp / "cert.json")]
    scipy = [sys.executable, str(ROOT / "benchmarks" / "scipy_dual.py"), str(table), "reward", str(BETA)]
    scipy += [f"u{j}={b}" for j, b in enumerate(MARGINS)]
    runs = {}
    for name, cmd in (("can dual (default options)", can), ("scipy L-BFGS-B script", scipy)):
        runs[name] = []
        for _ in range(3):  # cold first, then two consecutive
            runs[name].append(timed(cmd, env))
            if cmd is can:  # each run's own stage times (the certificate is rewritten by the next run)
                runs[name][-1]["timing"] = json.loads((tmp / "cert.json").read_text()).get("timing")
        print(name, [f"{r['seconds']:.2f}s {r['peak_gb']:.2f}GB" for r in runs[name]], flush=True)
    floors = {name: min(timed(cmd, env)["seconds"] for _ in range(3)) for name, cmd in floor_commands(table).items()}
    print("floors", floors, flush=True)
    cert = json.loads((tmp / "cert.json").read_text())
    rows = {}
    for name, rs in runs.items():
        best = min(rs[1:], key=lambda r: r["seconds"])
        rows[name] = {"cold_s": rs[0]["seconds"], "best_of_2_s": best["seconds"],
                      "peak_gb": max(r["peak_gb"] for r in rs), "runs": rs}  # fmt: skip
    ratio = rows["scipy L-BFGS-B script"]["best_of_2_s"] / rows["can dual (default options)"]["best_of_2_s"]
    size_mb = table.stat().st_size / 1e6
    payload = {"machine": machine(), "table": {"n": args.n, "k": args.k, "m": m, "parquet_mb": size_mb},
               "rows": rows, "speedup_vs_scipy": ratio, "floors_s": floors, "certificate_timing": cert.get("timing"),
               "certificate_lambda": cert.get("lambda")}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dual_e2e_{args.tag}.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    lines = [f"# `can dual` end to end vs a scipy script — {args.tag}", "", f"Machine: {payload['machine']}", "",
             f"Table: N = {args.n:,} prompts × K = {args.k} × m = {m}, Parquet {size_mb:.0f} MB. "
             "Whole processes; cold = the first run (empty compile cache), best of the 2 runs that follow; "
             "peak = maximum resident set (/usr/bin/time -v).", "",
             "| run | cold s | best of 2 s | peak GB |", "|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cold_s']:.2f} | {r['best_of_2_s']:.2f} | {r['peak_gb']:.2f} |")
    ours = rows["can dual (default options)"]["best_of_2_s"]
    peak = rows["can dual (default options)"]["peak_gb"]
    best = min(runs["can dual (default options)"][1:], key=lambda r: r["seconds"])
    timing = best.get("timing") or {}
    inside = sum(v for k, v in timing.items() if k.endswith("_s"))
    floor = floors["both: import jax and read the table"]
    after = ours - floor  # everything a process that imports JAX and reads the table does not already do
    payload["after_import_and_read_s"] = after

    def verdict(ok):
        return "met" if ok else "not met"

    lines += ["", "| target | measured | verdict |", "|---|---|---|",
              f"| ≥ 1.5× the scipy script | {ratio:.2f}× | {verdict(ratio >= 1.5)} |",
              f"| peak ≤ 1.5 GB | {peak:.2f} GB | {verdict(peak <= 1.5)} |",
              f"| everything after import and read ≤ 0.3 s | {after:.2f} s | {verdict(after <= 0.3)} |", "",
              "## Why: where the time goes", "",
              "Processes that do only part of the job, best of 3 each, in the same run:", "",
              "| process | seconds |", "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {sec:.2f} |" for name, sec in floors.items()]
    lines += ["", f"A process that only imports JAX and reads the table's columns takes {floor:.2f} s; `can dual` "
              f"takes {ours:.2f} s, so {after:.2f} s go to everything else. Of `can dual`'s {ours:.2f} s, the "
              f"certificate's stages take {inside:.2f} s (that run's `{json.dumps(timing)}`: load = read + the "
              "packed layout; solve = compiled programs loaded from the cache + the passes; bias = the finite-K "
              f"correction), the remaining {ours - inside:.2f} s are imports, start-up and writing the "
              "certificate.", ""]  # fmt: skip
    (out / f"dual_e2e_{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
