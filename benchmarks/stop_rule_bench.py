"""How often `can refine`'s stopping rule stops falsely, in the parametric worlds.

The rule (`can_jax.refine.stop_rule`): stop when every active constraint's measured gain is within
tol_j = max(0.02, h_j) of b_j and every slack one is at least b_j − tol_j, with h_j the half-width of the m intervals
at joint level 95% (Bonferroni: each at 1 − 0.05/m). A stop promises that every true gain is within h_j of its
measurement, hence every active one within tol_j + h_j of b_j (no slack one below b_j − tol_j − h_j); a stop where
the exact gain breaks that promise is a **false stop**. The table also counts the *strict* misses (exact gain
outside tol_j itself), which no rule of this form can bound, and the same rule with uncorrected 95% intervals.

Policies: in each world (the worlds of benchmarks/refine_bench.py: m = 1, 2, 4, 8 × --seeds worlds) the one-shot CAN
policy and those of 4 refine rounds (from π_ref, Newton then secant steps on measured gains), so the policies sit
from far off to close to their margins, where a stop can be false. Each policy is measured R times, every time on
N_c fresh prompts × K_c = 8 samples from it and from π_ref (new prompts and new samples, as a user's calibration
set would be); exact gains on 20,000 fresh prompts (over every response)
stand for the truth. N_c = 48 (the demo's calibration set,
wide intervals) and N_c = 2000 (the refine benchmark's).

python benchmarks/stop_rule_bench.py --seeds 2    # → benchmarks/results/refine/stop_rule.{md,json} (what was run)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402

from benchmarks.refine_bench import KIND, Config, evaluate_params, fit_dpo, refine_step_jit, setup  # noqa: E402
from bridge.files import atomic_write_text  # noqa: E402
from can_jax.refine import refine_init, simultaneous_level  # noqa: E402
from can_jax.sim.parametric import draw_world, measure_gains  # noqa: E402
from can_jax.sim.policy import init_policy, policy_log_probs  # noqa: E402
from can_jax.solve import solve_dual_jit  # noqa: E402

ROUNDS = 4
REPEATS = 200
CALIB_SIZES = (48, 2000)
FLOOR = 0.02
TRUTH_PROMPTS = 20_000  # exact gains over all responses of this many fresh prompts stand for the population's


def _measure_many(keys, params, fam, n_prompts, responses, k):
    """R measurements, each on fresh prompts: [R, m] gains and standard errors."""

    def one(key):
        kw, km = jax.random.split(key)
        world = draw_world(kw, fam, n_prompts, responses)
        meas = measure_gains(km, world, policy_log_probs(params, world, KIND), k)
        return meas.utility_gain, meas.utility_se

    return jax.vmap(one)(keys)


_measure_many_jit = jax.jit(_measure_many, static_argnums=(3, 4, 5))


def judge(gain, se, exact, b, active, n_prompts, level, floor=FLOOR):
    """Per measurement [R]: (stop, false stop, strict miss) of the rule with intervals at joint `level` over m."""
    q = student_t.ppf(0.5 + level / 2, n_prompts - 1)
    h = q * se  # [R, m]
    tol = np.maximum(floor, h)
    ok = np.where(active, np.abs(gain - b) <= tol, gain >= b - tol)
    stop = ok.all(axis=1)
    wide = tol + h
    kept = np.where(active, np.abs(exact - b) <= wide, exact >= b - wide).all(axis=1)
    strict = np.where(active, np.abs(exact - b) <= tol, exact >= b - tol).all(axis=1)
    return stop, stop & ~kept, stop & ~strict


def run_world(cfg: Config, m: int, seed: int, repeats: int):
    fam, train, calib, _, smp = setup(cfg, m, seed)
    truth = draw_world(jax.random.key(99 + 7 * seed + 1000 * m), fam, TRUTH_PROMPTS, cfg.responses)
    b = np.asarray(fam.margins)
    res = solve_dual_jit(smp.scores, fam.margins, cfg.beta)
    kp = jax.random.key(7 + seed)
    init = init_policy(None, train, KIND)

    def fit(lam):
        return fit_dpo(init, lam, kp, train, smp, cfg.beta, cfg.lr, cfg.dpo_steps, cfg.pairs_per_prompt)

    state = refine_init(res.x, res.hess)
    lam = res.x
    params = fit(lam)
    rows = []
    steer = jax.random.split(jax.random.key(500 + 31 * seed + m), ROUNDS + 1)
    for rnd in range(ROUNDS + 1):
        exact = np.asarray(evaluate_params(params, truth, cfg.beta).utility_gain)
        active = np.asarray(lam) > 0
        for n_c in CALIB_SIZES:
            keys = jax.random.split(jax.random.key(10_000 * seed + 100 * m + 10 * rnd + n_c), repeats)
            gain, se = (np.asarray(x) for x in _measure_many_jit(keys, params, fam, n_c, cfg.responses,
                                                                 cfg.calib_samples))  # fmt: skip
            for label, level in (("Bonferroni", simultaneous_level(m)), ("uncorrected", 0.95)):
                stop, false, strict = judge(gain, se, exact, b, active, n_c, level)
                rows.append({"m": m, "seed": seed, "round": rnd, "calib_prompts": n_c, "intervals": label,
                             "trials": repeats, "stops": int(stop.sum()), "false_stops": int(false.sum()),
                             "strict_misses": int(strict.sum()),
                             "exact_gap": float(np.max(np.where(active, np.abs(exact - b),
                                                                np.maximum(b - exact, 0))))})  # fmt: skip
        # The next round steers on one measurement of the refine benchmark's size (N_c = 2000).
        meas = measure_gains(steer[rnd], calib, policy_log_probs(params, calib, KIND), cfg.calib_samples)
        state = refine_step_jit(state, meas.utility_gain, fam.margins)
        lam = state.lam
        params = fit(lam)
    return rows


def aggregate(rows):
    out = []
    for n_c in CALIB_SIZES:
        for label in ("Bonferroni", "uncorrected"):
            for m in sorted({r["m"] for r in rows}):
                rs = [r for r in rows if r["m"] == m and r["calib_prompts"] == n_c and r["intervals"] == label]
                trials = sum(r["trials"] for r in rs)
                stops = sum(r["stops"] for r in rs)
                false = sum(r["false_stops"] for r in rs)
                strict = sum(r["strict_misses"] for r in rs)
                out.append({"calib_prompts": n_c, "intervals": label, "m": m, "trials": trials, "stops": stops,
                            "false_stop_rate": false / trials, "false_per_stop": false / stops if stops else None,
                            "strict_miss_rate": strict / trials,
                            "strict_per_stop": strict / stops if stops else None})  # fmt: skip
    return out


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def report(payload) -> str:
    lines = [
        "# The stopping rule of `can refine`: false stops in the parametric worlds",
        "",
        f"Generated by `python benchmarks/stop_rule_bench.py --seeds {len(payload['seeds'])} --repeats "
        f"{payload['repeats']}` in {payload['seconds']:.0f} s on "
        f"{payload['machine']}. Every number below was measured in this run.",
        "",
        f"Worlds of benchmarks/refine_bench.py (m = 1, 2, 4, 8 × {len(payload['seeds'])} seeds); in each, the "
        f"one-shot policy and {ROUNDS} refine rounds'; each policy measured {payload['repeats']} times on N_c "
        "fresh prompts × 8 samples "
        "(and π_ref's); exact gains on 20,000 fresh prompts are the truth. A **false stop**: the rule stops but "
        "some active constraint's exact gain is farther than tol + h from its margin (or a slack one below b − tol − "
        "h), the promise a stop makes. **Strict miss**: a stop whose exact gain is outside tol itself.",
        "",
        "| N_c | intervals | m | trials | stops | false stops / trials | false stops / stops | strict misses / "
        "trials | strict misses / stops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["summary"]:
        lines.append(f"| {r['calib_prompts']} | {r['intervals']} | {r['m']} | {r['trials']} | {r['stops']} | "
                     f"{_pct(r['false_stop_rate'])} | {_pct(r['false_per_stop'])} | {_pct(r['strict_miss_rate'])} | "
                     f"{_pct(r['strict_per_stop'])} |")  # fmt: skip
    worst = max(r["false_stop_rate"] for r in payload["summary"] if r["intervals"] == "Bonferroni")
    lines += ["", f"Target: false stops ≤ 5% of trials with the Bonferroni intervals, at every m and N_c: worst "
              f"{100 * worst:.1f}% ({'met' if worst <= 0.05 else 'not met'}).", ""]  # fmt: skip
    return "\n".join(lines)


def main(out: Path, repeats: int, seeds: tuple) -> str:
    cfg = Config(seeds=seeds)
    t0 = time.perf_counter()
    rows = []
    for m in cfg.ms:
        for seed in cfg.seeds:
            rows += run_world(cfg, m, seed, repeats)
            print(f"m = {m}, world {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    payload = {"rows": rows, "summary": aggregate(rows), "repeats": repeats, "seeds": list(seeds),
               "seconds": time.perf_counter() - t0,
               "machine": f"{platform.machine()}, jax {jax.__version__}, {jax.default_backend()}"}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "stop_rule.json", json.dumps(payload, indent=1) + "\n")
    text = report(payload)
    atomic_write_text(out / "stop_rule.md", text)
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--seeds", type=int, default=3, help="worlds per m")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "refine"))
    args = ap.parse_args()
    print(main(Path(args.out), args.repeats, tuple(range(args.seeds))))
