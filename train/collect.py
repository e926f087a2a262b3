"""`can collect`: sample K responses per prompt from π_ref, record log π_ref the DPO way, score, write the table.

Work is done in shards of prompts, each written atomically with its own seed (seed + shard index), so a crash
loses at most the shard in flight and a resumed run reproduces exactly the table an uninterrupted run writes.
Prompts go through the policy's chat template when it has one; the rendered text is stored as `prompt` (what DPO
trains on) and the user's text as `instruction` (what scorers read).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bridge.files import atomic_write_bytes, atomic_write_text
from can_jax.errors import CanError


@dataclass
class CollectConfig:
    prompts: str
    policy: str = "smollm2"
    scorers: list = field(default_factory=lambda: ["helpfulness=builtin:helpfulness"])
    k: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    batch_size: int = 16
    shard_size: int = 16
    max_length: int = 512
    seed: int = 0


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line (.txt) or a "prompt" field per line (.jsonl). Empty prompts are an error."""
    path = Path(path)
    if not path.exists():
        raise CanError(f"prompt file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        try:
            prompts = [json.loads(ln).get("prompt", "") if ln.strip() else "" for ln in lines]
        except json.JSONDecodeError as err:
            raise CanError(f"{path}: not JSON Lines ({err})") from None
    else:
        prompts = lines
    while prompts and not str(prompts[-1]).strip():
        prompts.pop()  # trailing newlines are fine
    empty = [i + 1 for i, p in enumerate(prompts) if not str(p).strip()]
    if empty:
        raise CanError(f"{path}: empty prompt on line(s) {empty[:10]}; remove them")
    if not prompts:
        raise CanError(f"{path}: no prompts")
    return [str(p) for p in prompts]


def render(tok, instruction: str) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    return instruction


@torch.no_grad()
def sample(model, tok, rendered: list[str], k: int, max_new_tokens: int, temperature: float, batch_size: int):
    """K samples per prompt (temperature 1 = samples of π_ref): list of K-lists of strings."""
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right end
    flat = [p for p in rendered for _ in range(k)]
    out = []
    try:
        for i in range(0, len(flat), batch_size):
            enc = tok(flat[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return [out[j * k : (j + 1) * k] for j in range(len(rendered))]


def _settings_hash(cfg: CollectConfig, prompts: list[str]) -> str:
    blob = json.dumps({**asdict(cfg), "prompts": prompts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def collect(cfg: CollectConfig, out: str | os.PathLike, progress=None) -> Path:
    """Runs the collection into `out` (.parquet), resuming from `out`.shards/ if it exists."""
    from train.logps import sequence_logps
    from train.models import load_policy
    from train.scorers import make_scorer, parse_scorer

    out = Path(out)
    prompts = read_prompts(cfg.prompts)
    scorers = [make_scorer(*parse_scorer(s)) for s in cfg.scorers]
    names = [s.name for s in scorers]
    if len(set(names)) != len(names) or {"prompt", "response", "prompt_id"} & set(names):
        raise CanError(f"scorer names must be distinct and not prompt/response/prompt_id: {names}")
    shard_dir = out.with_name(out.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    stamp = shard_dir / "settings.json"
    digest = _settings_hash(cfg, prompts)
    if stamp.exists() and json.loads(stamp.read_text())["hash"] != digest:
        raise CanError(f"{shard_dir} holds shards made with other settings or prompts; delete it or change --out")
    atomic_write_text(stamp, json.dumps({"hash": digest, "config": asdict(cfg)}, indent=2))

    model, tok = load_policy(cfg.policy, "cuda" if torch.cuda.is_available() else None)
    model.eval()
    n_shards = (len(prompts) + cfg.shard_size - 1) // cfg.shard_size
    for s in range(n_shards):
        path = shard_dir / f"shard-{s:05d}.parquet"
        if path.exists():
            if progress:
                progress(s, n_shards, True)
            continue
        lo = s * cfg.shard_size
        chunk = prompts[lo : lo + cfg.shard_size]
        rendered = [render(tok, p) for p in chunk]
        torch.manual_seed(cfg.seed + s)
        samples = sample(model, tok, rendered, cfg.k, cfg.max_new_tokens, cfg.temperature, cfg.batch_size)
        pid = np.repeat(np.arange(lo, lo + len(chunk)), cfg.k)
        instr = [p for p in chunk for _ in range(cfg.k)]
        rend = [p for p in rendered for _ in range(cfg.k)]
        resp = [r for rs in samples for r in rs]
        cols = {"prompt_id": pid, "instruction": instr, "prompt": rend, "response": resp}
        cols["logp_ref"] = sequence_logps(model, tok, rend, resp, max_length=cfg.max_length,
                                          batch_size=cfg.batch_size).numpy()  # fmt: skip
        for sc in scorers:
            cols[sc.name] = sc(instr, resp)
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        if progress:
            progress(s, n_shards, False)
    tables = [pq.read_table(shard_dir / f"shard-{s:05d}.parquet") for s in range(n_shards)]
    meta = {"scorers": {sc.name: {"spec": sc.spec, "template": sc.template} for sc in scorers}, **asdict(cfg)}
    table = pa.concat_tables(tables).replace_schema_metadata({b"can.collect": json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out, sink.getvalue().to_pybytes())
    return out
