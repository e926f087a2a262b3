"""Samples/s of the two samplers of `can collect` on SmolLM2-135M-Instruct, in one run on this machine: the exact
loop on Transformers (`--engine hf`, `train.sampling.ExactSampler`) and vLLM (`--engine vllm`,
`train.sampling.VLLMSampler`), on the same prompt ids, K samples each, temperature 1, the same stop ids. Only the
sampling is timed (the log-prob pass and the scorers are the same code after either); vLLM's start-up (loading the
model, profiling) is reported beside it. Repeats alternate the engines; medians.

Needs vLLM (its own virtualenv: scripts/test_vllm.sh makes .venv-vllm):

    .venv-vllm/bin/python benchmarks/engine_bench.py            # 32 prompts × K = 8 × 48 new tokens, 3 repeats

Writes benchmarks/results/engine_cpu.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(args) -> dict:
    import torch

    from train.demo_prompts import training_prompts
    from train.models import load_policy, resolve_policy
    from train.sampling import ExactSampler, VLLMSampler, prompt_seed, stop_ids
    from train.tokens import as_prompts, prompt_ids

    model, tok = load_policy("smollm2")
    model.eval()
    prompts = as_prompts(tok, training_prompts(args.prompts), True)
    ids = [prompt_ids(tok, p) for p in prompts]
    stop = stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    exact = ExactSampler(model, pad, args.batch_size)
    t = time.perf_counter()
    vllm = VLLMSampler(resolve_policy("smollm2"))
    vllm.start()
    startup = time.perf_counter() - t
    seeds = [prompt_seed(0, i) for i in range(len(ids))]
    runs = {"hf": [], "vllm": []}
    tokens = {"hf": [], "vllm": []}
    try:
        for rep in range(args.repeats):
            for name in ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf"):
                t = time.perf_counter()
                if name == "hf":
                    drawn = exact.sample(ids, args.k, args.max_new_tokens, stop, rep)
                else:
                    drawn = vllm.draw(ids, [s + rep for s in seeds], args.k, args.max_new_tokens, stop)
                runs[name].append(time.perf_counter() - t)
                tokens[name].append(sum(len(r) for rows in drawn.ids for r in rows))
    finally:
        vllm.close()
    n = len(ids) * args.k
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    rows = {name: {"seconds": statistics.median(ts), "samples_per_s": n / statistics.median(ts),
                   "tokens_per_s": statistics.median(tokens[name]) / statistics.median(ts), "runs": ts}
            for name, ts in runs.items()}  # fmt: skip
    import transformers
    import vllm as vllm_pkg

    return {"prompts": len(ids), "k": args.k, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "repeats": args.repeats, "vllm_startup_s": startup, "engines": rows,
            "vllm_over_hf": rows["vllm"]["samples_per_s"] / rows["hf"]["samples_per_s"],
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "vllm": vllm_pkg.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "load_avg_at_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}}  # fmt: skip


def write(result: dict, out: Path) -> None:
    from bridge.files import atomic_write_text

    m = result["machine"]
    lines = [f"# Sampling engines on SmolLM2-135M-Instruct ({m['date']}, {m['cpu']}, {m['cores']} cores)", "",
             f"{result['prompts']} demo prompts × K = {result['k']}, up to {result['max_new_tokens']} new tokens, "
             f"temperature 1; median of {result['repeats']} alternating runs; torch {m['torch']}, vLLM {m['vllm']}, "
             f"transformers {m['transformers']}. Sampling only (log π_ref and the scorers follow either).", "",
             "| engine | seconds | samples/s | tokens/s |", "|---|---|---|---|"]  # fmt: skip
    for name, r in result["engines"].items():
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.1f} |")
    lines += ["", f"vLLM / hf: **{result['vllm_over_hf']:.2f}×** samples/s; vLLM's start-up (load, profile) "
              f"{result['vllm_startup_s']:.0f} s, once per `can collect`.", ""]  # fmt: skip
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":  # vLLM starts its engine with spawn: the guard is required
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64, help="the exact loop's sequences per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_cpu"))
    a = ap.parse_args()
    res = main(a)
    write(res, Path(a.out))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=2))
