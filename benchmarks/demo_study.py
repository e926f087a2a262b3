"""What makes the demo's DPO carry the certificate's gains to fresh prompts.

Runs configurations of the embedded chain (SmolLM2-135M-Instruct, lexical scorers, CPU) and writes one row each to
benchmarks/results/demo_study/{selection,test}.{md,json}: predicted gains, gains on the training samples, held-out
gains with 95% intervals, the reward gain, KL, the text check (distinct-2, log π_ref per token) and wall times.

    python benchmarks/demo_study.py baseline prompts128 ... --set selection   # choose on the selection set
    python benchmarks/demo_study.py demo --set test --seeds 0 1               # check the choice once, fresh prompts

(configurations first: --seeds takes every number after it.)

Configurations with the same collection settings share one collection (its time is counted in each row); the
reference policy is sampled once per prompt set and seed. Finished configurations are read back, not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bridge.reports import EvaluationReport, GainRow  # noqa: E402

# The demo's settings before the study; each configuration changes some of them. "n_train": that many templated
# training prompts (train.demo_prompts) instead of the 32 fixed ones. "demo" is `can demo`'s default as it is now.
BASE = {"n_train": None, "k": 8, "max_new_tokens": 40, "mode": "soft", "pairs_per_prompt": 8, "epochs": 3.0,
        "lr": 1e-4, "lora": False, "train_top": 8, "margin_frac": 0.5}  # fmt: skip
P128 = {"n_train": 128, "pairs_per_prompt": 2}
CONFIGS = {
    "baseline": ("the demo before the study: 32 fixed prompts, 8 pairs each, 3 epochs", {}),
    "prompts128": ("128 templated prompts, 2 pairs each (same 768 pair-epochs)", P128),
    "prompts128-1ep": ("128 prompts, 6 pairs each, 1 epoch (768 pair-epochs, no pair seen twice)",
                       {**P128, "pairs_per_prompt": 6, "epochs": 1.0}),
    "1ep-hard": ("prompts128-1ep with hard labels", {**P128, "pairs_per_prompt": 6, "epochs": 1.0, "mode": "hard"}),
    "1ep-hard-lr2e-4": ("1ep-hard at learning rate 2e-4 (same steps and time)",
                        {**P128, "pairs_per_prompt": 6, "epochs": 1.0, "mode": "hard", "lr": 2e-4}),
    "1ep-hard-12pairs": ("1ep-hard with 12 pairs per prompt (twice the pairs and DPO steps, none seen twice)",
                         {**P128, "pairs_per_prompt": 12, "epochs": 1.0, "mode": "hard"}),
    "12pairs-risky-half": ("1ep-hard-12pairs with half of the training prompts risky instead of a third",
                           {**P128, "pairs_per_prompt": 12, "epochs": 1.0, "mode": "hard", "risky_share": 0.5}),
    "192prompts-8pairs": ("1ep-hard with 192 prompts × 8 pairs (the 12-pair row's 1,536 pairs and DPO steps, 1.5× the "
                          "prompts)", {**P128, "n_train": 192, "pairs_per_prompt": 8, "epochs": 1.0, "mode": "hard"}),
    "demo": ("`can demo`'s default", None),
}  # fmt: skip


def config(name: str, seed: int, eval_prompts: list):
    from benchmarks.baseline_prompts import TRAIN_PROMPTS
    from train.demo import DemoConfig
    from train.demo_prompts import training_prompts

    if CONFIGS[name][1] is None:
        return replace(DemoConfig(), seed=seed, eval_prompts=list(eval_prompts))
    over = {**BASE, **CONFIGS[name][1]}
    n = over.pop("n_train")
    mix = {k: over.pop(k) for k in ("risky_share",) if k in over}  # training_prompts' own default otherwise
    prompts = list(TRAIN_PROMPTS) if n is None else training_prompts(n, seed=0, **mix)
    dpo = replace(DemoConfig().dpo, **{k: over.pop(k) for k in ("epochs", "lr", "lora", "train_top") if k in over})
    return replace(DemoConfig(), seed=seed, eval_prompts=list(eval_prompts), train_prompts=prompts, dpo=dpo, **over)


def collection(cfg, work: Path) -> tuple[Path, float]:
    """The shared collection for cfg's settings, and the seconds it took when it was made."""
    from train.demo import collect_samples

    digest = hashlib.sha256("\n".join(cfg.train_prompts).encode()).hexdigest()[:8]
    key = f"collect-n{len(cfg.train_prompts)}-{digest}-k{cfg.k}-t{cfg.max_new_tokens}-s{cfg.seed}"
    folder = work / key
    done = folder / "seconds.json"
    if done.exists():
        return folder / "scores.parquet", json.loads(done.read_text())["collect"]
    t = time.perf_counter()
    path = collect_samples(cfg, folder)
    sec = time.perf_counter() - t
    done.write_text(json.dumps({"collect": sec}))
    return path, sec


def row(name: str, seed: int, report: EvaluationReport, collect_s: float) -> dict:
    sec = dict(report.seconds, collect=collect_s)
    return {"config": name, "seed": seed, "what": CONFIGS[name][0], "rows": [g.as_dict() for g in report.rows],
            "text": report.text, "lambda": report.lam, "seconds": sec, "total_s": sum(sec.values())}  # fmt: skip


def markdown(rows: list[dict], title: str) -> str:
    names = [r["name"] for r in rows[0]["rows"]]
    head = ["config", "seed"]
    for n in names:
        head += [f"{n}: predicted / on training / held out [95%] (ratio)"]
    head += ["KL", "distinct-2 (ref)", "log π_ref/token (ref)", "wall"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], str(r["seed"])]
        for g in map(GainRow.from_dict, r["rows"]):
            pred, ins, ach, (lo, hi) = g.predicted_gain, g.insample_gain, g.achieved_gain, g.ci95
            ratio = "" if not pred else f" ({ach / pred:.2f})"
            cells.append(f"{pred:+.3f} / {ins:+.3f} / **{ach:+.3f}** [{lo:+.3f}, {hi:+.3f}]{ratio}")
        t = r["text"]
        cells += [f"{t['kl']:.2f}", f"{t['distinct_2']['aligned']:.3f} ({t['distinct_2']['reference']:.3f})",
                  f"{t['logp_ref_per_token']['aligned']:+.2f} ({t['logp_ref_per_token']['reference']:+.2f})",
                  f"{r['total_s'] / 60:.1f} min"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    names = dict.fromkeys(r["config"] for r in rows)
    lines += ["", "Configurations:", ""] + [f"- **{n}**: {CONFIGS[n][0]}" for n in names]
    lines += ["", "Gains in the safe direction; ratio = held-out / predicted. Wall: collect + dual + label + DPO + "
              "evaluate on 2 CPU cores (a shared collection counts in full in each row)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--set", choices=["selection", "test"], default="selection")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/can-demo-study"))
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "demo_study")
    args = ap.parse_args()

    from train.cli.app import setup_jax
    from train.demo import run_chain
    from train.demo_prompts import SELECTION_PROMPTS, TEST_PROMPTS

    setup_jax()  # float64, as `can demo` solves the dual (the selection rows before this line solved it in float32)

    prompts = SELECTION_PROMPTS if args.set == "selection" else TEST_PROMPTS
    args.results.mkdir(parents=True, exist_ok=True)
    table = args.results / f"{args.set}.json"
    done = json.loads(table.read_text()) if table.exists() else []
    sets = {"selection": SELECTION_PROMPTS, "test": TEST_PROMPTS}
    snap = args.results / "prompt_sets.json"  # every row of a table is measured on the same prompts
    if snap.exists() and json.loads(snap.read_text()) != sets:
        sys.exit(f"the prompt sets changed since {snap} was written: move the old results away first")
    snap.write_text(json.dumps(sets, indent=1) + "\n")
    memo: dict = {}
    for seed in args.seeds:
        for name in args.configs:
            if any(r["config"] == name and r["seed"] == seed for r in done):
                print(f"{name} seed {seed}: already in {table}")
                continue
            cfg = config(name, seed, prompts)
            scores, collect_s = collection(cfg, args.work)
            print(f"== {name} seed {seed}: {CONFIGS[name][0]}", flush=True)
            report = run_chain(cfg, args.work / args.set / f"{name}-s{seed}", scores=scores, reference_memo=memo)
            done.append(row(name, seed, report, collect_s))
            table.write_text(json.dumps(done, indent=2) + "\n")
            title = f"Demo study: {len(prompts)} {args.set} prompts × {cfg.eval_k} samples per policy"
            (args.results / f"{args.set}.md").write_text(markdown(done, title))
            print(markdown(done[-1:], name), flush=True)


if __name__ == "__main__":
    main()
