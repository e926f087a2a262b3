"""Throughput of the MoCAN chain on the SmolLM2-135M architecture (issue #4): collect → dual → label → DPO →
evaluate at realistic sizes, timing each stage.

    python benchmarks/lm_throughput.py --policy smollm2                 # the real model (CPU or GPU)
    python benchmarks/lm_throughput.py --config-dir DIR --random-init   # same architecture, random weights

The random-weight mode exists for machines the 94 MB model file cannot reach (the GPU sandbox takes 64 MiB);
its throughput numbers hold for the architecture, its gains say nothing about alignment. Writes JSON to --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--config-dir", help="config.json + tokenizer files of the architecture (with --random-init)")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="lm_throughput")
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    import torch

    from train.demo import EVAL_PROMPTS, TRAIN_PROMPTS, DemoConfig, run_chain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = args.policy
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(args.config_dir)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        policy = str(out / "random-smollm2")
        model.save_pretrained(policy)
        AutoTokenizer.from_pretrained(args.config_dir).save_pretrained(policy)
    prompts = [f"{p} (variant {i})" for i in range(args.prompts // len(TRAIN_PROMPTS) + 1) for p in TRAIN_PROMPTS]
    scorers = ["helpfulness=builtin:helpfulness", "e=tests.train.toy_scorers:e_share",
               "brevity=tests.train.toy_scorers:brevity"]  # fmt: skip
    cfg = DemoConfig(policy=policy, scorers=scorers, train_prompts=prompts[: args.prompts],
                     eval_prompts=EVAL_PROMPTS * 4, k=args.k, max_new_tokens=args.max_new_tokens, beta=0.1,
                     margin_frac=0.3, pairs_per_prompt=2, epochs=1, lr=1e-5, batch_size=32, max_length=256,
                     gen_batch_size=args.batch_size)  # fmt: skip
    t = time.perf_counter()
    report = run_chain(cfg, out / "chain", say=print)
    total = time.perf_counter() - t
    sec = report["seconds"]
    samples = args.prompts * args.k
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "random_init": args.random_init, "prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
        "seconds": sec, "total_s": total,
        "collect_samples_per_s": samples / sec["collect"],
        "collect_new_tokens_per_s_upper": samples * args.max_new_tokens / sec["collect"],
        "pairs": args.prompts * 2, "label_train_pairs_per_s": args.prompts * 2 / sec["label+train"],
        "eval_samples": 2 * len(cfg.eval_prompts) * args.k,
        "rows": report["rows"],
    }  # fmt: skip
    (out / "lm_throughput.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
