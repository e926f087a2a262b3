"""`can collect`: sample K responses per prompt from π_ref, record log π_ref the DPO way, score, write the table.

Work is done in shards of prompts, each written atomically with its own seed (seed + shard index), so a crash
loses at most the shard in flight and a resumed run reproduces exactly the table an uninterrupted run writes.

One tokenisation path (`train.tokens`): prompts are text or conversations; with a chat template, text prompts
become one-turn conversations and TRL's rule makes their ids (the template applied once). Samples are drawn from
those ids by `train.sampling` (exactly π_ref, whatever the model's generation config says). The table stores the
prompt as TRL sees it (`prompt`: text or a conversation), the user's prompt (`instruction`, what scorers read),
the response text, the sampled ids (`prompt_ids`, `response_ids`: what DPO trains on), `finished`, `retokenizes`
(whether the text would re-tokenise to those ids) and `logp_ref`, the log-prob of exactly those ids under π_ref.
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

from bridge.files import atomic_write_text, write_parquet
from bridge.scores_table import CollectRecord, write_scores_table
from can_jax.errors import CanError, at_least_one
from train.logratios import parse_aligned, pecan_columns, pecan_meta  # noqa: F401
from train.prompts import (  # noqa: F401  (where callers have always found them)
    check_context,
    check_sampling,
    ensure_dir,
    ensure_file_parent,
    read_prompts,
    sample,
)
from train.scorers import scorer_field


@dataclass
class CollectConfig:
    prompts: str
    policy: str = "smollm2"
    scorers: list = field(default_factory=lambda: ["helpfulness=builtin:helpfulness"])
    k: int = 4
    max_new_tokens: int = 48
    batch_size: int = 64  # sequences (prompts × K) per sampling batch
    shard_size: int = 16
    # Log-probs of the sampled ids uncut (what was drawn); a DPO run whose max_length cuts a pair says so.
    max_length: int | None = None
    seed: int = 0
    aligned: list = field(default_factory=list)  # PeCAN: NAME=DIR pre-aligned policies (`can prealign` output)
    chat_template: bool = True  # text prompts through the policy's chat template (as one-turn conversations)
    scorer_template: str = scorer_field("template")
    scorer_dtype: str = scorer_field("dtype")
    scorer_max_length: int | None = scorer_field("max_length")
    scorer_batch_size: int = scorer_field("batch_size")
    dtype: str = "fp32"  # the policies' weights: fp32, bf16 or fp16 (log-probs from a float32 LM head either way)
    engine: str = "hf"  # what samples π_ref: hf (the exact loop on Transformers) or vllm
    engine_options: list = field(default_factory=list)  # KEY=VALUE settings of vLLM's engine

    def scorer_options(self) -> dict:
        from train.scorers import scorer_options

        return scorer_options(self.scorer_template, self.scorer_dtype, self.scorer_max_length, self.scorer_batch_size)

    def check(self) -> None:
        """Refuses settings that would fail later or give a useless table, before any work or file."""
        if self.k < 2:
            raise CanError(f"--k {self.k}: sample at least 2 responses per prompt (the dual, label and stability "
                           "compare the responses of a prompt)")  # fmt: skip
        check_sampling(self.k, self.max_new_tokens, self.batch_size, "--k")
        at_least_one(("--shard-size", self.shard_size), ("--scorer-batch-size", self.scorer_batch_size))
        if self.scorer_max_length is not None:
            at_least_one(("--scorer-max-length", self.scorer_max_length))
        if self.max_length is not None:
            at_least_one(("max_length", self.max_length))
        from train.sampling import ENGINES, VLLM_MISSING, engine_options

        if self.engine not in ENGINES:
            raise CanError(f"--engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.engine_options and self.engine != "vllm":
            raise CanError("--engine-options are vLLM's settings: give them with --engine vllm")
        engine_options(self.engine_options)
        import importlib.util

        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise CanError(VLLM_MISSING)


def shard_columns(model, tok, chunk: list, cfg: CollectConfig, seed: int, scorers: list, others=(), aligned=(),
                  first_id: int = 0, conv: bool = False, backend=None) -> dict:  # fmt: skip
    """The columns of one shard: K samples of each prompt in `chunk` (seed `seed`; drawn by `backend`, default the
    exact loop), log π_ref of each, PeCAN's columns for the `aligned` models (`others` loaded), the scores. `conv`:
    scorers read every prompt as a conversation (some prompts of the file are)."""
    from train.tokens import as_prompts

    drawn = sample(model, tok, as_prompts(tok, chunk, cfg.chat_template), cfg.k, cfg.max_new_tokens, cfg.batch_size,
                   seed=seed, backend=backend)  # fmt: skip
    # Scorers read the user's prompt; when some prompts are conversations, all are read as conversations.
    instr = [p for p in (as_prompts(tok, chunk, True) if conv else chunk) for _ in range(cfg.k)]
    ids = list(zip(drawn["prompt_ids"], drawn["response_ids"], strict=True))
    logp = drawn.pop("logp", None)
    cols = {"prompt_id": np.repeat(np.arange(first_id, first_id + len(chunk)), cfg.k), "instruction": instr, **drawn}
    # The loop's log-probs are those of the float32 logits each token was drawn from: the pass's up to rounding
    # (tests: within 1e-4 of a float64 forward). A bf16/fp16 policy's cached decoding and a full forward round
    # differently (SmolLM2 bf16: 0.3 nats per 48-token sample apart), and DPO and evaluation recompute the pass's
    # value; a --max-length cuts; PeCAN needs the pass for the other policies anyway. Then the pass runs.
    if logp is not None and cfg.dtype == "fp32" and cfg.max_length is None and not aligned:
        cols["logp_ref"] = np.asarray(logp, dtype=np.float32)
    else:
        cols.update(pecan_columns(model, list(others), tok, list(aligned), drawn["prompt"], drawn["response"],
                                  drawn["finished"], cfg.max_length, cfg.batch_size, ids=ids))  # fmt: skip
    for sc in scorers:
        cols[sc.name] = sc(instr, drawn["response"])
    return cols


def _settings_hash(cfg: CollectConfig, prompts: list[str]) -> str:
    blob = json.dumps({**asdict(cfg), "prompts": prompts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _stamp_hash(stamp: Path) -> str | None:
    try:
        return json.loads(stamp.read_text())["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: the shards beside it are judged by the rule above


def _changed_scorers(stamp: Path, prints: dict) -> list[str]:
    """The scorers whose fingerprint differs from the one the shards were scored under (all of them for a stamp
    that records none: shards of unknown scorer code are not trusted)."""
    try:
        was = json.loads(stamp.read_text()).get("scorers") or {}
    except (OSError, ValueError, AttributeError):
        was = {}
    return [name for name, fp in prints.items() if was.get(name) != fp]


def collect(cfg: CollectConfig, out: str | os.PathLike, progress=None) -> Path:
    """Runs the collection into `out` (.parquet), resuming from `out`.shards/ if it exists.

    Under `accelerate launch` each process samples and scores the shards it owns (`train.dist.owned`: shard s
    belongs to rank s mod world; its seed is seed + s whatever the rank), writes them, and the main process merges:
    the table is identical for any number of processes. Each shard records the rank that wrote it.
    """
    from train import dist
    from train.models import load_policy
    from train.scorers import make_scorer, parse_scorer
    from train.tokens import as_prompts, is_conversation

    cfg.check()
    st = dist.state()
    if cfg.engine == "vllm" and st.num_processes > 1:
        raise CanError("--engine vllm runs in one process (vLLM spreads itself over GPUs: give --engine-options "
                       "tensor_parallel_size=N instead of --num-processes)")  # fmt: skip
    device = dist.device(st)
    out = ensure_file_parent(out)
    prompts = read_prompts(cfg.prompts)
    parsed = [parse_scorer(s) for s in cfg.scorers]
    aligned = [parse_aligned(a) for a in cfg.aligned]
    names = [p[0] for p in parsed] + [a[0] for a in aligned]
    if not names:
        raise CanError("nothing to record: give --scorer NAME=SPEC and/or --aligned NAME=DIR")
    reserved = {"prompt", "response", "prompt_id", "instruction", "logp_ref", "logp_engine", "finished", "prompt_ids",
                "response_ids", "retokenizes"}  # fmt: skip
    if len(set(names)) != len(names) or reserved & set(names):
        raise CanError(f"scorer and aligned-model names must be distinct and not one of {sorted(reserved)}: {names}")
    shard_dir = ensure_dir(out.with_name(out.name + ".shards"))
    stamp = shard_dir / "settings.json"
    digest = _settings_hash(cfg, prompts)
    old_shards = sorted(shard_dir.glob("shard-*.parquet"))
    if stamp.exists() and _stamp_hash(stamp) != digest and old_shards:
        raise CanError(f"{shard_dir} holds shards made with other settings or prompts; delete it or change --out")
    n_shards = (len(prompts) + cfg.shard_size - 1) // cfg.shard_size
    if cfg.engine == "vllm":  # every shard's samples first, then the engine's memory is freed for what follows
        _presample(cfg, prompts, shard_dir, n_shards, digest)
    scorers = [make_scorer(*p, **cfg.scorer_options(), device=device) for p in parsed]
    model, tok = load_policy(cfg.policy, device, cfg.dtype)
    model.eval()
    rendered = as_prompts(tok, prompts, cfg.chat_template, where=cfg.prompts)  # refused before work: no template
    check_context(model, tok, rendered, cfg.max_new_tokens, cfg.prompts)
    prints = {sc.name: sc.fingerprint() for sc in scorers}
    changed = _changed_scorers(stamp, prints) if old_shards else []
    st.wait_for_everyone()  # every rank has checked the old stamp before the main process replaces it
    if st.is_main_process:
        if changed:
            # The same settings and seeds with a scorer whose code or model changed: its scores in the finished
            # shards are another function's, so those shards are redone (the samples come out the same).
            import warnings

            for f in old_shards:
                f.unlink(missing_ok=True)
            warnings.warn(f"scorer(s) {', '.join(changed)} changed since the {len(old_shards)} finished shards in "
                          f"{shard_dir} were scored (another source file or model): those shards are redone",
                          stacklevel=2)  # fmt: skip
        atomic_write_text(stamp, json.dumps({"hash": digest, "config": asdict(cfg), "scorers": prints}, indent=2))
    st.wait_for_everyone()  # no rank looks for finished shards before stale ones are gone

    conv = any(is_conversation(p) for p in prompts)
    others = [load_policy(path, device, cfg.dtype)[0].eval() for _, path, _ in aligned]
    for s in dist.owned(n_shards, st.process_index, st.num_processes):
        path = shard_dir / f"shard-{s:05d}.parquet"
        if path.exists():
            if progress:
                progress(s, n_shards, True)
            continue
        lo = s * cfg.shard_size
        backend = _kept_samples(shard_dir, s, digest) if cfg.engine == "vllm" else None
        cols = shard_columns(model, tok, prompts[lo : lo + cfg.shard_size], cfg, cfg.seed + s, scorers, others,
                             aligned, first_id=lo, conv=conv, backend=backend)  # fmt: skip
        writer = {"rank": st.process_index, "world": st.num_processes}
        write_parquet(path, pa.table(cols).replace_schema_metadata({b"can.shard": json.dumps(writer).encode()}))
        if progress:
            progress(s, n_shards, False)
    st.wait_for_everyone()
    if not st.is_main_process:
        st.wait_for_everyone()  # until the main process has merged
        return out
    missing = [s for s in range(n_shards) if not (shard_dir / f"shard-{s:05d}.parquet").exists()]
    if missing:
        raise CanError(f"shards {missing[:10]} are missing from {shard_dir}: rerun to resume")
    tables = [pq.read_table(shard_dir / f"shard-{s:05d}.parquet") for s in range(n_shards)]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    from train.tokens import tokenizer_fingerprint

    record = CollectRecord.build(
        asdict(cfg), cfg.scorers, tokenizer_fingerprint(tok),
        # logp_ref is log π_ref of exactly the sampled ids, uncut, under the float32 policy: `can train` may use it
        # in place of TRL's reference pass (bridge.labels carries it only then).
        logp_ref_exact=cfg.max_length is None and cfg.dtype == "fp32",
        scorers={sc.name: {**sc.record(), "truncated_this_run": sc.truncated} for sc in scorers},
        samples=table.num_rows, unfinished=table.num_rows - sum(table.column("finished").to_pylist()),
        not_retokenizing=table.num_rows - sum(table.column("retokenizes").to_pylist()),
        pecan=pecan_meta(aligned) if aligned else None, sampling=_sampling_block(cfg, table),
    )  # fmt: skip
    write_scores_table(out, table, record)
    st.wait_for_everyone()
    return out


def _samples_path(shard_dir: Path, s: int) -> Path:
    return shard_dir / f"shard-{s:05d}.samples.json"


def _presample(cfg: CollectConfig, prompts: list, shard_dir: Path, n_shards: int, digest: str) -> None:
    """`--engine vllm`: draws the samples of every shard not yet sampled with vLLM, from the very prompt ids the
    Transformers path builds, and keeps each shard's in OUT.shards/shard-N.samples.json (atomically: a killed run
    resumes); then shuts the engine down, so its memory is free for the log-prob pass and the scorers. Prompt i of
    shard s is drawn with seed `prompt_seed(seed + s, i)`, so a prompt's samples do not depend on its batch. Each file
    carries the settings' hash: samples kept under other settings are refused, never reused."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from train.models import resolve_policy
    from train.sampling import VLLMSampler, engine_options, prompt_seed, stop_ids
    from train.tokens import as_prompts, prompt_ids

    todo = [s for s in range(n_shards) if not (shard_dir / f"shard-{s:05d}.parquet").exists()
            and _kept_samples(shard_dir, s, digest, missing_ok=True) is None]  # fmt: skip
    if not todo:
        return
    path = resolve_policy(cfg.policy)
    tok = AutoTokenizer.from_pretrained(path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = None
    model = SimpleNamespace(config=AutoConfig.from_pretrained(path), generation_config=gen)  # what stop ids read
    rendered = as_prompts(tok, prompts, cfg.chat_template, where=cfg.prompts)
    check_context(model, tok, rendered, cfg.max_new_tokens, cfg.prompts)  # a prompt past the context: one line
    stop = stop_ids(model, tok)
    sampler = VLLMSampler(path, cfg.dtype, engine_options(cfg.engine_options))
    group = max(1, 256 // cfg.shard_size)  # shards per engine call: batches large enough for the engine
    try:
        for lo in range(0, len(todo), group):
            shards = todo[lo : lo + group]
            ids, seeds, spans = [], [], []
            for s in shards:
                chunk = [prompt_ids(tok, p) for p in rendered[s * cfg.shard_size : (s + 1) * cfg.shard_size]]
                spans.append((s, len(ids), chunk))
                ids += chunk
                seeds += [prompt_seed(cfg.seed + s, i) for i in range(len(chunk))]
            drawn = sampler.draw(ids, seeds, cfg.k, cfg.max_new_tokens, stop)
            for s, at, chunk in spans:
                part = slice(at, at + len(chunk))
                kept = {"settings": digest, "prompt_ids": chunk, "k": cfg.k, "max_new_tokens": cfg.max_new_tokens,
                        "ids": drawn.ids[part], "finished": drawn.finished[part],
                        "engine_logp": drawn.engine_logp[part]}  # fmt: skip
                atomic_write_text(_samples_path(shard_dir, s), json.dumps(kept))
    finally:
        sampler.close()


def _kept_samples(shard_dir: Path, s: int, digest: str, missing_ok: bool = False):
    """The backend that hands shard s its samples drawn by `_presample` under the settings hashed `digest` (None
    when there are none and `missing_ok`)."""
    from train.sampling import Presampled, Samples

    path = _samples_path(shard_dir, s)
    if not path.exists():
        if missing_ok:
            return None
        raise CanError(f"{path} is missing: rerun to draw it")
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = None
    if not isinstance(kept, dict) or kept.get("settings") != digest:
        raise CanError(f"{path} holds samples drawn with other settings or prompts (or is damaged); delete "
                       f"{shard_dir} or change --out")  # fmt: skip
    return Presampled(kept["prompt_ids"], Samples(kept["ids"], kept["finished"], None, kept["engine_logp"]),
                      kept["k"], kept["max_new_tokens"])  # fmt: skip


def _sampling_block(cfg: CollectConfig, table: pa.Table) -> dict:
    """The collect record's `sampling` block: which engine drew the samples and, for an engine with log-probs of its
    own, how far they are from log π_ref of the Transformers forward (nats per sequence)."""
    block = {"engine": cfg.engine}
    if "logp_engine" in table.column_names:
        gap = np.abs(table.column("logp_engine").to_numpy() - table.column("logp_ref").to_numpy())
        block["logp_gap"] = {"median": float(np.median(gap)), "max": float(np.max(gap))}
    return block
