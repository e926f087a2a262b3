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
from bridge.scores_table import CollectRecord, collect_record, write_scores_table
from can_jax.errors import CanError


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
    scorer_template: str = "auto"  # score models: "auto", "safe-rlhf", "chat" or a {prompt}/{response} format
    scorer_dtype: str = "fp32"
    scorer_max_length: int | None = None
    scorer_batch_size: int = 16
    dtype: str = "fp32"  # the policies' weights: fp32, bf16 or fp16 (log-probs from a float32 LM head either way)

    def scorer_options(self) -> dict:
        from train.scorers import scorer_options

        return scorer_options(self.scorer_template, self.scorer_dtype, self.scorer_max_length, self.scorer_batch_size)

    def check(self) -> None:
        """Refuses settings that would fail later or give a useless table, before any work or file (issue 23)."""
        if self.k < 2:
            raise CanError(f"--k {self.k}: sample at least 2 responses per prompt (the dual, label and stability "
                           "compare the responses of a prompt)")  # fmt: skip
        check_sampling(self.k, self.max_new_tokens, self.batch_size, "--k")
        at_least_one(("--shard-size", self.shard_size), ("--scorer-batch-size", self.scorer_batch_size))
        if self.scorer_max_length is not None:
            at_least_one(("--scorer-max-length", self.scorer_max_length))
        if self.max_length is not None:
            at_least_one(("max_length", self.max_length))


def at_least_one(*named) -> None:
    """CanError for the first (option, value) below 1."""
    for name, value in named:
        if value < 1:
            raise CanError(f"{name} must be at least 1, got {value}")


def check_sampling(k: int, max_new_tokens: int, batch_size: int, k_name: str = "--k") -> None:
    """K ≥ 1 samples, responses of at least one token, batches of at least one sequence."""
    at_least_one((k_name, k), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size))


def ensure_dir(path: str | os.PathLike) -> Path:
    """`path` as a folder, created if needed; `OutputError` (one line naming it) where it cannot be: a file in the
    way or as a parent, no permission, a read-only disk."""
    from can_jax.errors import OutputError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        if isinstance(err, FileExistsError) or path.is_file():
            reason = "a file is in the way"
        raise OutputError(f"cannot write {path}: {reason}") from None
    return path


def ensure_file_parent(path: str | os.PathLike) -> Path:
    """The folder of an output file created (`ensure_dir`); `OutputError` when the file's path is a folder."""
    from can_jax.errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    ensure_dir(path.parent)
    return path


def context_length(model, tok) -> int | None:
    """The policy's context in tokens (its position limit), or None when it declares none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**7 else None


def check_context(model, tok, prompts: list, max_new_tokens: int, where: str = "prompts", name: str = "the policy"):
    """Refuses a prompt (as TRL sees it) whose ids plus `max_new_tokens` do not fit in the policy's context: the
    samples past it would be garbage (or an index error)."""
    from train.tokens import prompt_ids

    limit = context_length(model, tok)
    if limit is None:
        return
    for i, p in enumerate(prompts):
        n = len(prompt_ids(tok, p))
        if n + max_new_tokens > limit:
            raise CanError(f"{where}: the prompt on line {i + 1} is {n} tokens, and with --max-new-tokens "
                           f"{max_new_tokens} it does not fit in {name}'s context of {limit} tokens: shorten it "
                           "or lower --max-new-tokens")  # fmt: skip


def read_prompts(path: str | os.PathLike) -> list:
    """One prompt per line (.txt), or per line a JSON object whose "prompt" is text or a conversation — a list of
    {"role", "content"} messages, TRL's conversational format (.jsonl). Empty prompts are an error."""
    from train.tokens import check_prompt

    path = Path(path)
    if not path.exists():
        raise CanError(f"prompt file not found: {path}")
    if path.is_dir():
        raise CanError(f"{path} is a directory: give a .txt or .jsonl file of prompts")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CanError(f"{path}: not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()  # trailing newlines are fine
    if not lines:
        raise CanError(f"{path}: no prompts")
    if path.suffix == ".jsonl":
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln) if ln.strip() else {}
            except json.JSONDecodeError as err:
                raise CanError(f"{path}: line {i} is not JSON ({err})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise CanError(f'{path}: line {i} has no "prompt" field')
            prompts.append(check_prompt(row["prompt"], f"{path} line {i}"))
        return prompts
    empty = [i + 1 for i, p in enumerate(lines) if not p.strip()]
    if empty:
        raise CanError(f"{path}: empty prompt on line(s) {empty[:10]}; remove them")
    return lines


def sample(model, tok, prompts: list, k: int, max_new_tokens: int, batch_size: int, seed: int = 0,
           backend=None) -> dict:  # fmt: skip
    """K samples of π_ref per prompt (prompts as TRL sees them: `train.tokens.as_prompts`), flattened prompt-major:
    {"prompt", "response", "prompt_ids", "response_ids", "finished", "retokenizes"} lists of n·K, and "logp" (log π
    of each sample's ids, from the logits it was drawn from) when the backend reports it. `backend`: a
    `train.sampling.Backend` (default: the exact loop on `model`)."""
    from train.sampling import ExactSampler, stop_ids
    from train.tokens import decode_response, prompt_ids, retokenizes

    check_sampling(k, max_new_tokens, batch_size)
    p_ids = [prompt_ids(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    backend = backend or ExactSampler(model, pad, batch_size)
    drawn = backend.sample(p_ids, k, max_new_tokens, stop_ids(model, tok), seed)
    out = {"prompt": [], "response": [], "prompt_ids": [], "response_ids": [], "finished": [], "retokenizes": []}
    if drawn.logp is not None:
        out["logp"] = [lp for row in drawn.logp for lp in row]
    for p, ids, rs, fs in zip(prompts, p_ids, drawn.ids, drawn.finished, strict=True):
        for r, f in zip(rs, fs, strict=True):
            text = decode_response(tok, r)
            out["prompt"].append(p)
            out["response"].append(text)
            out["prompt_ids"].append(ids)
            out["response_ids"].append(r)
            out["finished"].append(f)
            out["retokenizes"].append(retokenizes(tok, p, text, ids, r))
    return out


PREALIGN_FILE = "prealign.json"
ROWS_PER_UNIT = 256  # rows per unit of work of a log-prob pass over an existing table (`train.dist`)


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


def pecan_columns(reference, others, tok, aligned, prompts, responses, finished, max_length, batch_size,
                  ids=None) -> dict:  # fmt: skip
    """log π_ref of sampled responses (`logp_ref`), and PeCAN's columns (DESIGN §3) per pre-aligned model
    (name, dir, β): NAME = β·ℓ with ℓ = log π_NAME − log π_ref, logp_NAME, kl_NAME (token-level KL along the sample) and
    ref_NAME = −β·kl_NAME, whose per-prompt mean is E_ref[β·ℓ | x]. With `ids` (the sampled (prompt_ids,
    response_ids)), log-probs are those of exactly these ids; without, of TRL's tokenisation of the text pairs."""
    from train.logps import logps_and_kl

    logp_ref, logp, kl = logps_and_kl(reference, others, tok, prompts, responses, max_length=max_length,
                                      batch_size=batch_size, finished=finished, ids=ids)  # fmt: skip
    cols = {"logp_ref": logp_ref.numpy()}
    for j, (name, _, beta) in enumerate(aligned):
        cols[f"logp_{name}"] = logp[:, j].numpy()
        cols[name] = beta * (logp[:, j] - logp_ref).numpy()
        cols[f"kl_{name}"] = kl[:, j].numpy()
        cols[f"ref_{name}"] = -beta * kl[:, j].numpy()
    return cols


def pecan_meta(aligned) -> dict:
    """The PeCAN models of a collect record: NAME → {policy, beta} (`bridge.scores_table.CollectRecord.pecan`)."""
    return {name: {"policy": path, "beta": beta} for name, path, beta in aligned}


def add_aligned(table_path: str | os.PathLike, aligned: list[str], out: str | os.PathLike, policy: str = "smollm2",
                max_length: int | None = None, batch_size: int = 16, dtype: str = "fp32") -> Path:  # fmt: skip
    """PeCAN's columns for the responses of an existing table of π_ref samples (e.g. a MoCAN collection): no new
    sampling, so MoCAN and PeCAN see the same responses. Writes `out` atomically and returns it."""
    from bridge.tables import read_table

    at_least_one(("--batch-size", batch_size))
    if max_length is not None:
        at_least_one(("--max-length", max_length))
    out = ensure_file_parent(out)
    table = read_table(table_path)
    missing = [c for c in ("prompt_id", "prompt", "response") if c not in table.column_names]
    if missing:
        raise CanError(f"{table_path}: missing column(s) {missing}; it needs the rendered prompt and the response")
    if table.num_rows == 0:
        raise CanError(f"{table_path}: no responses")
    parsed = [parse_aligned(a) for a in aligned]
    clash = [n for n, _, _ in parsed if n in table.column_names]
    if clash:
        raise CanError(f"{table_path} already has column(s) {clash}: name the pre-aligned models differently")
    from train import dist
    from train.models import load_policy

    st = dist.state()
    device = dist.device(st)
    reference, tok = load_policy(policy, device, dtype)
    others = [load_policy(path, device, dtype)[0].eval() for _, path, _ in parsed]
    rows = table.select(["prompt", "response"]).to_pydict()
    finished = table.column("finished").to_pylist() if "finished" in table.column_names else None
    ids = None
    if {"prompt_ids", "response_ids"} <= set(table.column_names):
        ids = list(zip(table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist(), strict=True))

    def block(u):  # a fixed block of rows, batched the same way whatever the number of processes
        sl = slice(u * ROWS_PER_UNIT, (u + 1) * ROWS_PER_UNIT)
        return pecan_columns(reference.eval(), others, tok, parsed, rows["prompt"][sl], rows["response"][sl],
                             None if finished is None else finished[sl], max_length, batch_size,
                             ids=None if ids is None else ids[sl])  # fmt: skip

    parts = dist.map_units(st, -(-table.num_rows // ROWS_PER_UNIT), block)
    if not st.is_main_process:
        st.wait_for_everyone()
        return Path(out)
    cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    for name, values in cols.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(values))
    exact = ids is not None and max_length is None and dtype == "fp32"  # logp_ref recomputed here
    record = collect_record(table).with_pecan(pecan_meta(parsed), exact)
    path = write_scores_table(out, table, record)
    st.wait_for_everyone()
    return path


def shard_columns(model, tok, chunk: list, cfg: CollectConfig, seed: int, scorers: list, others=(), aligned=(),
                  first_id: int = 0, conv: bool = False) -> dict:  # fmt: skip
    """The columns of one shard: K samples of each prompt in `chunk` (seed `seed`), log π_ref of each, PeCAN's
    columns for the `aligned` models (`others` loaded), the scores. `conv`: scorers read every prompt as a
    conversation (some prompts of the file are)."""
    from train.tokens import as_prompts

    drawn = sample(model, tok, as_prompts(tok, chunk, cfg.chat_template), cfg.k, cfg.max_new_tokens, cfg.batch_size,
                   seed=seed)  # fmt: skip
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
    device = dist.device(st)
    out = ensure_file_parent(out)
    prompts = read_prompts(cfg.prompts)
    scorers = [make_scorer(*parse_scorer(s), **cfg.scorer_options(), device=device) for s in cfg.scorers]
    aligned = [parse_aligned(a) for a in cfg.aligned]
    names = [s.name for s in scorers] + [a[0] for a in aligned]
    if not names:
        raise CanError("nothing to record: give --scorer NAME=SPEC and/or --aligned NAME=DIR")
    reserved = {
        "prompt",
        "response",
        "prompt_id",
        "instruction",
        "logp_ref",
        "finished",
        "prompt_ids",
        "response_ids",
        "retokenizes",
    }
    if len(set(names)) != len(names) or reserved & set(names):
        raise CanError(f"scorer and aligned-model names must be distinct and not one of {sorted(reserved)}: {names}")
    model, tok = load_policy(cfg.policy, device, cfg.dtype)
    model.eval()
    rendered = as_prompts(tok, prompts, cfg.chat_template)  # conversations without a template: refused before work
    check_context(model, tok, rendered, cfg.max_new_tokens, cfg.prompts)
    shard_dir = ensure_dir(out.with_name(out.name + ".shards"))
    stamp = shard_dir / "settings.json"
    digest = _settings_hash(cfg, prompts)
    if stamp.exists() and _stamp_hash(stamp) != digest and any(shard_dir.glob("shard-*.parquet")):
        raise CanError(f"{shard_dir} holds shards made with other settings or prompts; delete it or change --out")
    st.wait_for_everyone()  # every rank has checked the old stamp before the main process replaces it
    if st.is_main_process:
        atomic_write_text(stamp, json.dumps({"hash": digest, "config": asdict(cfg)}, indent=2))

    conv = any(is_conversation(p) for p in prompts)
    others = [load_policy(path, device, cfg.dtype)[0].eval() for _, path, _ in aligned]
    n_shards = (len(prompts) + cfg.shard_size - 1) // cfg.shard_size
    for s in dist.owned(n_shards, st.process_index, st.num_processes):
        path = shard_dir / f"shard-{s:05d}.parquet"
        if path.exists():
            if progress:
                progress(s, n_shards, True)
            continue
        lo = s * cfg.shard_size
        cols = shard_columns(model, tok, prompts[lo : lo + cfg.shard_size], cfg, cfg.seed + s, scorers, others,
                             aligned, first_id=lo, conv=conv)  # fmt: skip
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
        pecan=pecan_meta(aligned) if aligned else None,
    )  # fmt: skip
    write_scores_table(out, table, record)
    st.wait_for_everyone()
    return out
