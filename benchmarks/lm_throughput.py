"""Throughput of the language-model stages: sampling, the collect stage, DPO — each against its peer
measured in the same run, on this machine.

    python benchmarks/lm_throughput.py                       # SmolLM2-135M (embedded), K = 8, 48 new tokens
    python benchmarks/lm_throughput.py --part collect         # only sampling / collect
    python benchmarks/lm_throughput.py --part dpo             # only DPO
    python benchmarks/lm_throughput.py --part chain [--random-init --config-dir DIR]   # the whole chain, timed

Collect stage = sampling + log π_ref of every sample + scoring, per sample. The baseline is the collect path before
the exact sampler (commit cd315cf), reproduced here as `old_collect`: `generate()` on K copies of each rendered prompt
(every copy recomputes the prompt's prefill), then a log-prob pass over the text pairs with the full [B, T, V]
logits. The new path is `train.collect.shard_columns`, what `can collect` runs per shard: our exact loop (one
prefill per prompt shared by its K samples, one uniform number per draw, log π_ref of each sample read off the
logits it was drawn from) and the scorers. Both at --batch-size (sequences per batch; cd315cf's default, 16) and at
--big-batch (`can collect`'s default now, 64). DPO: `train.dpo.CanDPOTrainer` with soft labels (what `can train`
runs for `can label --mode soft`) against TRL's plain `DPOTrainer` on the same pairs with hard labels, the same
trainable parameters (top 8 of 30 blocks, as the demo), the same DPOConfig. Repeats alternate the peers; medians;
ratios within the run.

Writes benchmarks/results/lm_throughput_cpu.md and .json (or --out).
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

SCORERS = ["helpfulness=builtin:helpfulness", "harmlessness=builtin:harmlessness", "politeness=builtin:politeness"]


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds: on a shared machine the process's CPU time is less sensitive to other jobs."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def since(t0: tuple[float, float]) -> tuple[float, float]:
    w, c = clocks()
    return w - t0[0], c - t0[1]


# ---- the pre-issue-12 collect path (commit cd315cf), kept here as the baseline -----------------------------------


def old_sample(model, tok, rendered, k, max_new_tokens, batch_size):
    """cd315cf's `train.collect.sample`: generate() on K copies of each rendered prompt."""
    import torch

    tok.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = [tok.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])]
    eos = torch.tensor([e for e in eos if e is not None])
    flat = [p for p in rendered for _ in range(k)]
    out, finished = [], []
    for i in range(0, len(flat), batch_size):
        enc = tok(flat[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
        new = gen[:, enc["input_ids"].shape[1] :]
        out += tok.batch_decode(new, skip_special_tokens=True)
        finished += torch.isin(new, eos).any(dim=1).tolist()
    tok.padding_side = "right"
    return out, finished


def old_logps(model, tok, prompts, responses, finished, max_length, batch_size):
    """cd315cf's `train.logps.logps_and_kl` with no other policy: TRL's text tokenisation of each pair, TRL's
    collator, and log-softmax over the full [B, T, V] logits."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from train.tokens import text_pair_ids

    pairs = [text_pair_ids(tok, p, r) for p, r in zip(prompts, responses, strict=True)]
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    out = []
    for i in range(0, len(pairs), batch_size):
        batch = collate([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": c} for p, c in pairs[i : i + batch_size]])
        n = len(pairs[i : i + batch_size])
        ids, attn, mask = batch["input_ids"][:n], batch["attention_mask"][:n], batch["completion_mask"][:n]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        out.append((lp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum(1))
    return torch.cat(out)


def old_collect(model, tok, prompts, scorers, k, max_new_tokens, batch_size, max_length=512):
    rendered = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts]  # fmt: skip
    t = clocks()
    resp, fin = old_sample(model, tok, rendered, k, max_new_tokens, batch_size)
    t_sample = since(t)
    rend = [p for p in rendered for _ in range(k)]
    old_logps(model, tok, rend, resp, fin, max_length, batch_size)
    instr = [p for p in prompts for _ in range(k)]
    for sc in scorers:
        sc(instr, resp)
    return t_sample, since(t)


def new_collect(model, tok, prompts, scorers, k, max_new_tokens, batch_size, max_length=None):
    """`train.collect.collect`'s work on one shard (`shard_columns`): exact sampling, log π_ref (read off the
    sampling loop for a float32 policy), scoring; the sampling part timed inside it."""
    import train.collect as tc
    from train.collect import CollectConfig, shard_columns

    cfg = CollectConfig(prompts="-", k=k, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    timed, real = {}, tc.sample

    def sample(*a, **kw):
        t0 = clocks()
        out = real(*a, **kw)
        timed["sample"] = since(t0)
        return out

    tc.sample = sample
    try:
        t = clocks()
        cols = shard_columns(model, tok, prompts, cfg, 0, scorers)
        return timed["sample"], since(t), cols
    finally:
        tc.sample = real


def bench_collect(args, res):
    import torch

    from benchmarks.baseline_prompts import TRAIN_PROMPTS
    from train.logps import logps_and_kl
    from train.models import load_policy
    from train.scorers import make_scorer, parse_scorer

    model, tok = load_policy(args.policy)
    model.eval()
    scorers = [make_scorer(*parse_scorer(s)) for s in SCORERS]
    prompts = TRAIN_PROMPTS[: args.prompts]
    n = len(prompts) * args.k
    peers = {f"old (cd315cf), batch {args.batch_size}": ("old", args.batch_size),
             f"new, batch {args.batch_size}": ("new", args.batch_size),
             f"old (cd315cf), batch {args.big_batch}": ("old", args.big_batch),
             f"new, batch {args.big_batch}": ("new", args.big_batch)}  # fmt: skip
    times = {name: {"sample": [], "collect": []} for name in peers}
    torch.manual_seed(0)
    new_collect(model, tok, prompts[:1], scorers, 2, 4, 2)  # warm-up (allocator, kernels)
    old_collect(model, tok, prompts[:1], scorers, 2, 4, 2)
    drawn = None
    for rep in range(args.repeats):
        for name, (kind, bs) in peers.items():
            if kind == "old":
                ts, tc = old_collect(model, tok, prompts, scorers, args.k, args.max_new_tokens, bs)
            else:
                ts, tc, drawn = new_collect(model, tok, prompts, scorers, args.k, args.max_new_tokens, bs)
            times[name]["sample"].append(ts)
            times[name]["collect"].append(tc)
            print(f"repeat {rep}: {name}: sampling {ts[0]:.1f} s (CPU {ts[1]:.1f} s), collect {tc[0]:.1f} s "
                  f"(CPU {tc[1]:.1f} s) ({n} samples)", flush=True)  # fmt: skip
    rows = []
    base = next(iter(peers))
    for name in peers:
        med = {f"{part}_{j}": statistics.median(t[j] for t in times[name][part]) for part in ("sample", "collect")
               for j in (0, 1)}  # fmt: skip
        rows.append({"path": name, "sampling_samples_per_s": n / med["sample_0"],
                     "collect_samples_per_s": n / med["collect_0"], "sampling_samples_per_cpu_s": n / med["sample_1"],
                     "collect_samples_per_cpu_s": n / med["collect_1"], "sampling_wall_cpu_s": times[name]["sample"],
                     "collect_wall_cpu_s": times[name]["collect"]})  # fmt: skip
    for r in rows:
        for key in ("sampling_samples_per_s", "collect_samples_per_s", "sampling_samples_per_cpu_s",
                    "collect_samples_per_cpu_s"):  # fmt: skip
            r[key.replace("samples_per", "vs_old")] = r[key] / rows[0][key]
    res["collect"] = {"baseline": base, "machine": machine(), "prompts": len(prompts), "k": args.k,
                      "max_new_tokens": args.max_new_tokens,
                      "samples": n, "repeats": args.repeats, "rows": rows}  # fmt: skip

    # bf16 weights move π: how far log π of the same sampled ids moves (per token), on this model.
    bf16, _ = load_policy(args.policy, dtype="bf16")
    ids = list(zip(drawn["prompt_ids"], drawn["response_ids"], strict=True))
    lp32 = logps_and_kl(model, [], tok, None, None, batch_size=args.batch_size, ids=ids)[0]
    lp16 = logps_and_kl(bf16.eval(), [], tok, None, None, batch_size=args.batch_size, ids=ids)[0]
    per_tok = ((lp16 - lp32).abs() / torch.tensor([max(1, len(c)) for _, c in ids])).tolist()
    res["bf16_vs_fp32_logp"] = {"samples": len(ids), "median_abs_per_token": statistics.median(per_tok),
                                "max_abs_per_token": max(per_tok),
                                "median_abs_per_sequence": statistics.median((lp16 - lp32).abs().tolist())}  # fmt: skip
    # The sampling loop's log-probs against the pass's, fp32 (what collect stores) and bf16 (why it does not there).
    from train.collect import sample
    from train.tokens import as_prompts

    loop32 = torch.as_tensor(drawn["logp_ref"], dtype=torch.float64)
    d16 = sample(bf16, tok, as_prompts(tok, prompts), args.k, args.max_new_tokens, args.big_batch, seed=0)
    ids16 = list(zip(d16["prompt_ids"], d16["response_ids"], strict=True))
    pass16 = logps_and_kl(bf16, [], tok, None, None, batch_size=args.batch_size, ids=ids16)[0].double()
    gap32, gap16 = (loop32 - lp32.double()).abs(), (torch.as_tensor(d16["logp"]) - pass16).abs()
    res["loop_vs_pass_logp"] = {"fp32_median": gap32.median().item(), "fp32_max": gap32.max().item(),
                                "bf16_median": gap16.median().item(), "bf16_max": gap16.max().item()}  # fmt: skip


def bench_dpo(args, res, workdir: Path):
    """DPO on pairs of SmolLM2's own samples (8 prompts × K = 8, 4 pairs per prompt), three ways with the same
    trainable blocks and DPOConfig: `can train`'s trainer on the sampled ids with the log π_ref collect recorded
    (what `can label` output trains with: no reference pass), the same without them (TRL's reference pass), and
    TRL's plain `DPOTrainer` on the text of the same pairs (hard labels)."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    from benchmarks.baseline_prompts import TRAIN_PROMPTS
    from train.collect import sample
    from train.dpo import CanDPOTrainer, SoftPreferenceCollator, make_config, train_top_layers
    from train.models import load_policy
    from train.tokens import as_prompts

    model, tok = load_policy(args.policy)
    k, per_prompt = 8, 4
    drawn = sample(model.eval(), tok, as_prompts(tok, TRAIN_PROMPTS[: args.pairs // per_prompt]), k,
                   args.max_new_tokens, args.big_batch, seed=1)  # fmt: skip
    idx = [(i * k + 2 * j, i * k + 2 * j + 1) for i in range(args.pairs // per_prompt) for j in range(per_prompt)]
    n = len(idx)
    rng = torch.Generator().manual_seed(0)
    p = torch.rand(n, generator=rng).mul(0.8).add(0.1).tolist()

    def col(name, side):
        return [drawn[name][pair[side]] for pair in idx]

    def turn(texts):  # conversational prompts take conversational completions (TRL's format)
        return [[{"role": "assistant", "content": t}] for t in texts] if isinstance(drawn["prompt"][0], list) else texts

    text = {"prompt": col("prompt", 0), "chosen": turn(col("response", 0)), "rejected": turn(col("response", 1))}
    ids = {"prompt_ids": col("prompt_ids", 0), "chosen_ids": col("response_ids", 0),
           "rejected_ids": col("response_ids", 1)}  # fmt: skip
    refs = {"logp_ref_chosen": col("logp", 0), "logp_ref_rejected": col("logp", 1)}
    data = {"recorded": Dataset.from_dict({**text, "p_chosen": p, **ids, **refs}),
            "pass": Dataset.from_dict({**text, "p_chosen": p, **ids}), "trl": Dataset.from_dict(text)}  # fmt: skip

    def run(kind, rep):
        model, _ = load_policy(args.policy)
        train_top_layers(model, 8)
        t = clocks()  # TRL computes the reference log-probs while the trainer is built: timed from here
        cfg = make_config(workdir / f"{kind}-{rep}", 0.5, num_train_epochs=1.0, learning_rate=1e-4,
                          per_device_train_batch_size=8, max_length=192, seed=0, precompute_ref_log_probs=True,
                          save_strategy="no", logging_steps=1000, disable_tqdm=True)  # fmt: skip
        if kind == "trl":
            trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=data[kind], processing_class=tok)
        else:
            calls, real = [], CanDPOTrainer.compute_ref_log_probs

            def counted(self, *a, **kw):  # one reference forward = the check of the recorded values
                calls.append(1)
                return real(self, *a, **kw)

            collator = SoftPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=192)
            CanDPOTrainer.compute_ref_log_probs = counted
            try:
                trainer = CanDPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=data[kind],
                                        processing_class=tok, data_collator=collator)  # fmt: skip
            finally:
                CanDPOTrainer.compute_ref_log_probs = real
            if kind == "recorded" and len(calls) != 1:
                raise SystemExit("the recorded log π_ref were not used: this row would time TRL's pass")
        trainer.train()
        return since(t)

    names = {"recorded": "can train, id pairs with the recorded log π_ref (soft labels)",
             "pass": "can train, id pairs, TRL's reference pass (soft labels)",
             "trl": "plain TRL DPOTrainer, text of the same pairs (hard labels)"}  # fmt: skip
    times = {kind: [] for kind in names}
    for rep in range(args.repeats):
        for kind in list(names) if rep % 2 == 0 else list(names)[::-1]:
            times[kind].append(run(kind, rep))
            w, c = times[kind][-1]
            print(f"repeat {rep}: {names[kind]}: {w:.1f} s (CPU {c:.1f} s) for {n} pairs", flush=True)
    rows = [{"trainer": names[kind], "pairs_per_s": n / statistics.median(t[0] for t in v),
             "pairs_per_cpu_s": n / statistics.median(t[1] for t in v), "wall_cpu_s": v}
            for kind, v in times.items()]  # fmt: skip
    for r in rows:
        r["vs_plain_trl"] = r["pairs_per_s"] / rows[-1]["pairs_per_s"]
        r["vs_plain_trl_cpu"] = r["pairs_per_cpu_s"] / rows[-1]["pairs_per_cpu_s"]
    res["dpo"] = {"pairs": n, "batch": 8, "max_length": 192, "trainable": "top 8 of 30 blocks",
                  "bf16_autocast": bool(make_config(workdir / "probe", 0.5).bf16), "repeats": args.repeats,
                  "rows": rows}  # fmt: skip


def bench_chain(args):
    """The whole MoCAN chain at realistic sizes, each stage timed (the H100 run: `--random-init` with
    `--config-dir` builds the architecture with random weights where the model file cannot be sent)."""
    import jax
    import torch

    jax.config.update("jax_enable_x64", True)
    from benchmarks.baseline_prompts import EVAL_PROMPTS, TRAIN_PROMPTS
    from train.demo import DemoConfig, run_chain
    from train.settings import DPOSettings

    out = Path(args.out).with_name(Path(args.out).name + "_chain")
    out.mkdir(parents=True, exist_ok=True)
    policy = args.policy
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config_dir))
        policy = str(out / "random-smollm2")
        model.save_pretrained(policy)
        AutoTokenizer.from_pretrained(args.config_dir).save_pretrained(policy)
    n = args.chain_prompts
    prompts = [f"{p} (variant {i})" for i in range(n // len(TRAIN_PROMPTS) + 1) for p in TRAIN_PROMPTS][:n]
    scorers = ["helpfulness=builtin:helpfulness", "e=tests.train.toy_scorers:e_share",
               "brevity=tests.train.toy_scorers:brevity"]  # fmt: skip
    cfg = DemoConfig(policy=policy, scorers=scorers, train_prompts=prompts, eval_prompts=EVAL_PROMPTS * 4, k=args.k,
                     max_new_tokens=args.max_new_tokens, beta=0.1, margin_frac=0.3, pairs_per_prompt=2,
                     dpo=DPOSettings(epochs=1, lr=1e-5, batch_size=32, train_top=8), max_length=256,
                     gen_batch_size=args.big_batch)  # fmt: skip
    t = time.perf_counter()
    report = run_chain(cfg, out / "chain", say=print)
    sec = report.seconds
    result = {"machine": machine(), "random_init": args.random_init, "prompts": n, "k": args.k,
              "max_new_tokens": args.max_new_tokens, "seconds": sec, "total_s": time.perf_counter() - t,
              "collect_samples_per_s": n * args.k / sec["collect"], "pairs": n * 2,
              "label_train_pairs_per_s": n * 2 / sec["label+train"],
              "rows": [g.as_dict() for g in report.rows]}  # fmt: skip
    (out / "lm_chain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Language-model throughput",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"{'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}. Load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])} (a trailing average: it counts the job that ran "
        "just before; a value well above 2 means other jobs shared the 2 cores and the absolute numbers are low and "
        "noisy). The ratios compare peers run alternately in the same process. Medians over repeats.",
        "",
    ]
    if "collect" in res:
        c = res["collect"]
        lines += [
            f"## Sampling and the collect stage (SmolLM2-135M-Instruct, fp32, {c['prompts']} prompts × K = "
            f"{c['k']}, {c['max_new_tokens']} new tokens, {c['repeats']} repeats)",
            "",
            "Collect = one shard's work: sampling + log π_ref + scoring (the three built-in scorers). Baseline: the "
            "path of commit cd315cf (`generate()` on K copies of each prompt, then a full-logits log-prob pass); "
            "its default batch was 16 sequences, the new default is 64. New: `train.collect.shard_columns` (one "
            "prefill per prompt shared by its K samples, one uniform per draw, log π_ref read off the sampling "
            "loop for a float32 policy).",
            "",
            "Wall-clock samples/s, and samples per CPU-second of the process (less sensitive to other jobs, though "
            "not immune: OpenMP threads spin while a sibling is descheduled); × old is the ratio to the first row "
            "in the same run.",
            "",
            "| path | sampling samples/s | × old | per CPU-s | × old | collect samples/s | × old | per CPU-s | × old |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            cells = [r.get(k) for k in ("sampling_samples_per_s", "sampling_vs_old_s", "sampling_samples_per_cpu_s",
                                        "sampling_vs_old_cpu_s", "collect_samples_per_s", "collect_vs_old_s",
                                        "collect_samples_per_cpu_s", "collect_vs_old_cpu_s")]  # fmt: skip
            lines.append(f"| {r['path']} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in cells) + " |")
        if "machine" in c:
            lines.append(f"\nLoad average when this part started: "
                         f"{', '.join(f'{x:.1f}' for x in c['machine']['load_avg_at_start'])}.")  # fmt: skip
        if c.get("note"):
            lines.append(f"Note: {c['note']}.")
        lines.append("")
    if "bf16_vs_fp32_logp" in res:
        b = res["bf16_vs_fp32_logp"]
        lines += [
            f"`--dtype bf16` moves π itself: on {b['samples']} of these samples, |log π_bf16 − log π_fp32| is "
            f"{b['median_abs_per_token']:.4f} nats per token (median; max {b['max_abs_per_token']:.4f}), "
            f"{b['median_abs_per_sequence']:.3f} per sequence (median) — the bf16 policy is a slightly different "
            "π_ref, sampled and scored consistently (float32 LM head for both).",
            "",
        ]
    if "loop_vs_pass_logp" in res:
        g = res["loop_vs_pass_logp"]
        lines += [
            "log π_ref from the sampling loop vs the DPO-way pass over the same ids (nats per sample): fp32 median "
            f"{g['fp32_median']:.1e}, max {g['fp32_max']:.1e} — float32 rounding, so collect stores the loop's; "
            f"bf16 median {g['bf16_median']:.3f}, max {g['bf16_max']:.3f} — cached decoding and a full forward "
            "round differently in bf16, so with `--dtype bf16` collect runs the pass (the value DPO and evaluation "
            "recompute).",
            "",
        ]
    if "dpo" in res:
        d = res["dpo"]
        lines += [
            f"## DPO ({d['pairs']} pairs of SmolLM2's samples, batch {d['batch']}, max length {d['max_length']}, "
            f"{d['trainable']} trainable, bf16 autocast {'on' if d['bf16_autocast'] else 'off'}, {d['repeats']} "
            "repeats)",
            "",
            "Time to build the trainer and train (the reference log-probs — TRL's pass, or the check of the "
            "recorded ones on a first batch — and the steps), wall clock and CPU time of the process.",
            "",
            "| trainer | pairs/s | × plain TRL | pairs per CPU-s | × plain TRL |",
            "|---|---|---|---|---|",
        ]
        for r in d["rows"]:
            lines.append(f"| {r['trainer']} | {r['pairs_per_s']:.3f} | {r.get('vs_plain_trl', 1.0):.2f} | "
                         f"{r['pairs_per_cpu_s']:.3f} | {r.get('vs_plain_trl_cpu', 1.0):.2f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--part", choices=["all", "collect", "dpo", "chain"], default="all")
    ap.add_argument("--random-init", action="store_true", help="chain: the architecture of --config-dir, random")
    ap.add_argument("--config-dir", help="chain: config.json + tokenizer files (with --random-init)")
    ap.add_argument("--chain-prompts", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--big-batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lm_throughput_cpu"))
    args = ap.parse_args()

    import tempfile

    import torch

    if args.part == "chain":
        return bench_chain(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_suffix(".json")
    res = json.loads(old.read_text()) if old.exists() and args.part != "all" else {}  # one part updates the other
    res["machine"] = machine()
    torch.manual_seed(0)
    if args.part in ("all", "collect"):
        bench_collect(args, res)
    if args.part in ("all", "dpo"):
        with tempfile.TemporaryDirectory() as tmp:
            bench_dpo(args, res, Path(tmp))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
