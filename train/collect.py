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

from bridge.files import atomic_write_text, write_parquet
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
    aligned: list = field(default_factory=list)  # PeCAN: NAME=DIR pre-aligned policies (`can prealign` output)


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
def sample(model, tok, rendered: list[str], k: int, max_new_tokens: int, temperature: float, batch_size: int,
           return_finished: bool = False):  # fmt: skip
    """K samples per prompt (temperature 1 = samples of π_ref): list of K-lists of strings; with `return_finished`,
    also K-lists of flags telling which samples ended with their own EOS (the others hit max_new_tokens, and the
    EOS that DPO's log-prob appends to them was not sampled — see `train.logps.logps_and_kl`)."""
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"  # generation continues from the right end
    eos = model.generation_config.eos_token_id
    eos = [tok.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])]
    eos = torch.tensor([e for e in eos if e is not None])
    flat = [p for p in rendered for _ in range(k)]
    out, finished = [], []
    try:
        for i in range(0, len(flat), batch_size):
            enc = tok(flat[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
            new = gen[:, enc["input_ids"].shape[1] :]
            out += tok.batch_decode(new, skip_special_tokens=True)
            finished += torch.isin(new, eos.to(new.device)).any(dim=1).tolist()
    finally:
        tok.padding_side = side
    texts = [out[j * k : (j + 1) * k] for j in range(len(rendered))]
    return (texts, [finished[j * k : (j + 1) * k] for j in range(len(rendered))]) if return_finished else texts


PREALIGN_FILE = "prealign.json"


def parse_aligned(text: str) -> tuple[str, str, float]:
    """`NAME=DIR` (β read from DIR/prealign.json, written by `can prealign`) or `NAME=DIR@BETA` → (name, dir, β)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise CanError(f"--aligned {text!r} is not of the form NAME=DIR or NAME=DIR@BETA")
    path, at, beta = rest.rpartition("@") if "@" in rest else (rest, "", "")
    if at:
        try:
            value = float(beta)
        except ValueError:
            raise CanError(f"--aligned {text!r}: β {beta!r} is not a number") from None
    else:
        stamp = Path(path) / PREALIGN_FILE
        if not stamp.exists():
            raise CanError(f"--aligned {text!r}: {stamp} not found; give the DPO β as NAME=DIR@BETA")
        value = float(json.loads(stamp.read_text())["beta"])
    if not value > 0:
        raise CanError(f"--aligned {text!r}: β must be positive")
    return name, path, value


def pecan_columns(reference, others, tok, aligned, prompts, responses, finished, max_length, batch_size) -> dict:
    """log π_ref of sampled responses (`logp_ref`), and PeCAN's columns (DESIGN §3) per pre-aligned model
    (name, dir, β): NAME = β·ℓ with ℓ = log π_NAME − log π_ref, logp_NAME, kl_NAME (token-level KL along the sample) and
    ref_NAME = −β·kl_NAME, whose per-prompt mean is E_ref[β·ℓ | x]."""
    from train.logps import logps_and_kl

    logp_ref, logp, kl = logps_and_kl(reference, others, tok, prompts, responses, max_length=max_length,
                                      batch_size=batch_size, finished=finished)  # fmt: skip
    cols = {"logp_ref": logp_ref.numpy()}
    for j, (name, _, beta) in enumerate(aligned):
        cols[f"logp_{name}"] = logp[:, j].numpy()
        cols[name] = beta * (logp[:, j] - logp_ref).numpy()
        cols[f"kl_{name}"] = kl[:, j].numpy()
        cols[f"ref_{name}"] = -beta * kl[:, j].numpy()
    return cols


def pecan_meta(aligned) -> dict:
    """The `pecan` entry of a table's `can.collect` metadata (read by `bridge.pecan.pecan_models`)."""
    return {name: {"policy": path, "beta": beta} for name, path, beta in aligned}


def add_aligned(table_path: str | os.PathLike, aligned: list[str], out: str | os.PathLike, policy: str = "smollm2",
                max_length: int = 512, batch_size: int = 16) -> Path:  # fmt: skip
    """PeCAN's columns for the responses of an existing table of π_ref samples (e.g. a MoCAN collection): no new
    sampling, so MoCAN and PeCAN see the same responses. Writes `out` atomically and returns it."""
    from bridge.tables import read_table

    table = read_table(table_path)
    missing = [c for c in ("prompt_id", "prompt", "response") if c not in table.column_names]
    if missing:
        raise CanError(f"{table_path}: missing column(s) {missing}; it needs the rendered prompt and the response")
    parsed = [parse_aligned(a) for a in aligned]
    clash = [n for n, _, _ in parsed if n in table.column_names]
    if clash:
        raise CanError(f"{table_path} already has column(s) {clash}: name the pre-aligned models differently")
    device = "cuda" if torch.cuda.is_available() else None
    from train.models import load_policy

    reference, tok = load_policy(policy, device)
    others = [load_policy(path, device)[0].eval() for _, path, _ in parsed]
    rows = table.select(["prompt", "response"]).to_pydict()
    finished = table.column("finished").to_pylist() if "finished" in table.column_names else None
    cols = pecan_columns(reference.eval(), others, tok, parsed, rows["prompt"], rows["response"], finished,
                         max_length, batch_size)  # fmt: skip
    for name, values in cols.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(values))
    meta = json.loads((table.schema.metadata or {}).get(b"can.collect", b"{}"))
    meta["pecan"] = pecan_meta(parsed)
    return write_parquet(out, table.replace_schema_metadata({b"can.collect": json.dumps(meta).encode()}))


def _settings_hash(cfg: CollectConfig, prompts: list[str]) -> str:
    blob = json.dumps({**asdict(cfg), "prompts": prompts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def collect(cfg: CollectConfig, out: str | os.PathLike, progress=None) -> Path:
    """Runs the collection into `out` (.parquet), resuming from `out`.shards/ if it exists."""
    from train.models import load_policy
    from train.scorers import make_scorer, parse_scorer

    out = Path(out)
    prompts = read_prompts(cfg.prompts)
    scorers = [make_scorer(*parse_scorer(s)) for s in cfg.scorers]
    aligned = [parse_aligned(a) for a in cfg.aligned]
    names = [s.name for s in scorers] + [a[0] for a in aligned]
    if not names:
        raise CanError("nothing to record: give --scorer NAME=SPEC and/or --aligned NAME=DIR")
    reserved = {"prompt", "response", "prompt_id", "instruction", "logp_ref", "finished"}
    if len(set(names)) != len(names) or reserved & set(names):
        raise CanError(f"scorer and aligned-model names must be distinct and not one of {sorted(reserved)}: {names}")
    shard_dir = out.with_name(out.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    stamp = shard_dir / "settings.json"
    digest = _settings_hash(cfg, prompts)
    if stamp.exists() and json.loads(stamp.read_text())["hash"] != digest:
        raise CanError(f"{shard_dir} holds shards made with other settings or prompts; delete it or change --out")
    atomic_write_text(stamp, json.dumps({"hash": digest, "config": asdict(cfg)}, indent=2))

    device = "cuda" if torch.cuda.is_available() else None
    model, tok = load_policy(cfg.policy, device)
    model.eval()
    others = [load_policy(path, device)[0].eval() for _, path, _ in aligned]
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
        samples, finished = sample(model, tok, rendered, cfg.k, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                   return_finished=True)  # fmt: skip
        pid = np.repeat(np.arange(lo, lo + len(chunk)), cfg.k)
        instr = [p for p in chunk for _ in range(cfg.k)]
        rend = [p for p in rendered for _ in range(cfg.k)]
        resp = [r for rs in samples for r in rs]
        ended = [f for fs in finished for f in fs]
        cols = {"prompt_id": pid, "instruction": instr, "prompt": rend, "response": resp, "finished": ended}
        cols.update(pecan_columns(model, others, tok, aligned, rend, resp, ended, cfg.max_length, cfg.batch_size))
        for sc in scorers:
            cols[sc.name] = sc(instr, resp)
        write_parquet(path, pa.table(cols))
        if progress:
            progress(s, n_shards, False)
    tables = [pq.read_table(shard_dir / f"shard-{s:05d}.parquet") for s in range(n_shards)]
    meta = {"scorers": {sc.name: {"spec": sc.spec, "template": sc.template} for sc in scorers}, **asdict(cfg)}
    if aligned:
        meta["pecan"] = pecan_meta(aligned)
    write_parquet(out, pa.concat_tables(tables).replace_schema_metadata({b"can.collect": json.dumps(meta).encode()}))
    return out
