"""Pseudo-preference datasets from a scores table and its dual certificate (DESIGN §4, §6; `can label`).

Each prompt's sampled responses are paired at random (distinct pairs: never the same pair twice); the pair is
labelled from s = r + λ*ᵀg by the one rule in `can_jax.labels` (bt, soft or hard). The output is a TRL-ready
preference table — prompt, chosen, rejected — with score_chosen, score_rejected and p_chosen (the Bradley–Terry
probability that chosen ≻ rejected, the soft target), and the certificate's β and λ* in the file's metadata, so a
GPU job needs nothing else. A conversational prompt keeps its messages, and the responses become assistant turns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bridge.files import sha256_file, write_parquet
from bridge.tables import bad_rows, check_one_prompt_per_id, prompt_keys, read_table
from can_jax.errors import CanError, ScoresFormatError
from can_jax.labels import MODES

META_KEY = b"can"


@dataclass(frozen=True)
class LabelStats:
    pairs: int
    prompts_used: int
    prompts_skipped: int  # fewer than two responses
    ties_dropped: int  # hard mode: equal scores have no chosen side
    pairs_capped: int = 0  # prompts with fewer distinct pairs than --pairs-per-prompt: all of theirs are used
    rows_dropped: int = 0  # bad rows dropped by the certificate's --drop-bad-rows rule


def scores_of(table: pa.Table, cert: dict) -> np.ndarray:
    """s = r + Σ_j λ_j g_j per row, with cost columns negated exactly as `can dual` read them."""
    data = cert["data"]
    s = np.asarray(table.column(data["reward"]).to_numpy(zero_copy_only=False), float).copy()
    for c in cert["constraints"]:
        col = np.asarray(table.column(c["name"]).to_numpy(zero_copy_only=False), float)
        s += c["lambda"] * (-col if c["kind"] == "cost" else col)
    return s


def pseudo_preferences(
    scores_path: str | os.PathLike,
    cert: dict,
    mode: str = "bt",
    pairs_per_prompt: int = 1,
    seed: int = 0,
    prompt_col: str = "prompt",
    response_col: str = "response",
    check_hash: bool = True,
) -> tuple[pa.Table, LabelStats]:
    """Builds the preference table: per prompt, `pairs_per_prompt` distinct pairs of distinct responses (all of
    a prompt's K(K−1)/2 pairs where it has fewer; counted in `pairs_capped`).

    A certificate is validated first (β, λ ≥ 0, the two λ views, the columns it names); with `check_hash` its λ is
    also re-checked as the dual's solution on this table. Rows `can dual --drop-bad-rows` dropped are dropped
    again; one prompt id must carry one prompt.
    """
    import jax

    from bridge.certificate import FORMAT, check_solution, validate_certificate
    from can_jax.labels import pair_targets

    if mode not in MODES:
        raise CanError(f"unknown labelling mode {mode!r}: use one of {', '.join(MODES)}")
    if pairs_per_prompt < 1:
        raise CanError("--pairs-per-prompt must be at least 1")
    real = isinstance(cert, dict) and cert.get("format") == FORMAT
    if real:
        validate_certificate(cert)
    if check_hash and sha256_file(scores_path) != cert["data"]["sha256"]:
        raise CanError(
            f"the certificate was computed on another scores table (sha256 {cert['data']['sha256'][:12]}…, "
            f"{scores_path} has another); re-run `can dual` on this table or pass --no-check-hash"
        )
    table = read_table(scores_path)
    pid_col = cert["data"].get("prompt_id", "prompt_id")
    names = [c["name"] for c in cert["constraints"]]
    needed = [pid_col, prompt_col, response_col, cert["data"]["reward"], *names]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ScoresFormatError(f"{scores_path}: missing column(s) {missing} needed for labels")
    if real and check_hash:
        check_solution(scores_path, cert)
    # The certificate's bad-row rule, on the same columns `can dual` checked (plus the prompt column used here).
    refs = [c for c in (cert["data"].get("reference_expectation") or {}).values() if c in table.column_names]
    keys, empty = prompt_keys(table.column(prompt_col), prompt_col)
    bad = bad_rows(table, cert["data"]["reward"], names, pid_col, refs) | empty
    if bad.any() and cert["data"].get("bad_rows") != "dropped":
        rows = np.flatnonzero(bad)
        raise ScoresFormatError(
            f"{scores_path}: {rows.size} row(s) with NaN/inf/missing scores, a missing prompt id or an empty prompt "
            f"(rows {rows[:8].tolist()}, 0-based), and the certificate was not made with --drop-bad-rows"
        )
    keep = np.flatnonzero(~bad)
    check_one_prompt_per_id(table.column(pid_col).take(pa.array(keep)), keys[keep], str(scores_path), pid_col,
                            prompt_col)  # fmt: skip
    s = scores_of(table, cert)

    # Rows of each prompt, grouped (kept rows only); ids numbered by first appearance.
    index = pa.chunked_array(table.column(pid_col)).take(pa.array(keep)).combine_chunks().dictionary_encode().indices
    index = index.to_numpy(zero_copy_only=False).astype(np.int64)
    order = keep[np.argsort(index, kind="stable")]
    counts = np.bincount(index) if index.size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    usable = np.flatnonzero(counts >= 2)
    if usable.size == 0:
        raise CanError(f"{scores_path}: no prompt has two usable responses: there is nothing to pair")
    rng = np.random.default_rng(seed)
    row_a, row_b, capped = _distinct_pairs(rng, usable, counts, starts, order, pairs_per_prompt)
    s_a, s_b = s[row_a], s[row_b]
    target = np.asarray(pair_targets(jax.random.key(seed), s_a, s_b, mode), float)  # P(a ≻ b) label
    ties = 0
    if mode == "hard":
        keep = s_a != s_b
        ties = int((~keep).sum())
        row_a, row_b, s_a, s_b, target = row_a[keep], row_b[keep], s_a[keep], s_b[keep], target[keep]
    # Orient each pair: bt/hard put the labelled winner first; soft puts the likelier one first, target ≥ 0.5.
    a_wins = target >= 0.5
    chosen = np.where(a_wins, row_a, row_b)
    rejected = np.where(a_wins, row_b, row_a)
    p_bt = 1.0 / (1.0 + np.exp(-(s[chosen] - s[rejected])))
    p_chosen = np.where(a_wins, target, 1.0 - target) if mode == "soft" else p_bt
    prompt = table.column(prompt_col).take(pa.array(chosen))
    sides = [table.column(response_col).take(pa.array(rows)) for rows in (chosen, rejected)]
    text = (pa.types.is_string, pa.types.is_large_string)
    if not any(t(prompt.type) for t in text) and any(t(sides[0].type) for t in text):
        # A conversational prompt (TRL's format): the responses become assistant turns.
        sides = [pa.array([[{"role": "assistant", "content": t}] for t in side.to_pylist()]) for side in sides]
    cols = {
        "prompt_id": table.column(pid_col).take(pa.array(chosen)),
        "prompt": prompt,
        "chosen": sides[0],
        "rejected": sides[1],
        "score_chosen": s[chosen],
        "score_rejected": s[rejected],
        "p_chosen": p_chosen,
    }
    if {"prompt_ids", "response_ids"} <= set(table.column_names):
        # The sampled token ids (train.tokens): DPO trains on exactly the ids log π_ref was recorded on.
        cols["prompt_ids"] = table.column("prompt_ids").take(pa.array(chosen))
        cols["chosen_ids"] = table.column("response_ids").take(pa.array(chosen))
        cols["rejected_ids"] = table.column("response_ids").take(pa.array(rejected))
        if "logp_ref" in table.column_names and _logp_ref_exact(table):  # `can train` skips its reference pass
            cols["logp_ref_chosen"] = table.column("logp_ref").take(pa.array(chosen))
            cols["logp_ref_rejected"] = table.column("logp_ref").take(pa.array(rejected))
    out = pa.table(cols)
    meta = {
        "beta": cert["beta"],
        "lambda": cert["lambda"],
        "mode": mode,
        "pairs_per_prompt": pairs_per_prompt,
        "seed": seed,
        "scores_sha256": cert["data"]["sha256"],
        "certificate_created": cert.get("created"),
    }
    meta["pairs_capped"] = capped
    meta["rows_dropped"] = int(bad.sum())
    out = out.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    stats = LabelStats(len(chosen), len(usable), int((counts < 2).sum()), ties, capped, int(bad.sum()))
    return out, stats


def _logp_ref_exact(table: pa.Table) -> bool:
    """Whether the table's logp_ref is log π_ref of exactly its sampled ids, uncut, under the float32 policy (its
    `can collect` metadata says so; `can collect --max-length`, `--dtype bf16` or a table of unknown origin: no)."""
    raw = (table.schema.metadata or {}).get(b"can.collect")
    try:
        return bool(json.loads(raw).get("logp_ref_exact")) if raw else False
    except (json.JSONDecodeError, AttributeError):
        return False


def _distinct_pairs(rng, usable, counts, starts, order, per_prompt: int):
    """(row_a, row_b, capped): for each usable prompt, min(per_prompt, K(K−1)/2) distinct unordered pairs of its
    rows, uniformly without replacement, in random orientation; `capped` counts prompts that had too few."""
    k = counts[usable]
    n_pairs = k * (k - 1) // 2
    take = np.minimum(per_prompt, n_pairs)
    capped = int((n_pairs < per_prompt).sum())
    if per_prompt == 1:
        first = rng.integers(0, k)
        second = (first + rng.integers(1, k)) % k  # uniform over the other K_i − 1 responses
    else:
        firsts, seconds = [], []
        triu = {}
        for ki, ti in zip(k.tolist(), take.tolist()):
            if ki not in triu:
                triu[ki] = np.triu_indices(ki, 1)
            pick = rng.choice(ki * (ki - 1) // 2, ti, replace=False)
            a, b = triu[ki][0][pick], triu[ki][1][pick]
            flip = rng.random(ti) < 0.5
            firsts.append(np.where(flip, b, a))
            seconds.append(np.where(flip, a, b))
        first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
        second = np.concatenate(seconds) if seconds else np.zeros(0, np.int64)
    base = np.repeat(starts[usable], take)
    return order[base + first], order[base + second], capped


def write_preferences(path: str | os.PathLike, table: pa.Table) -> Path:
    """Atomic Parquet write (the metadata travels in the schema)."""
    return write_parquet(path, table)


def score_preferences(
    scores_path: str | os.PathLike, column: str, pairs_per_prompt: int = 1, seed: int = 0, mode: str = "hard"
) -> tuple[pa.Table, LabelStats]:
    """Preference pairs labelled by one score column alone — a stand-in for human preference data on one aspect,
    the input of PeCAN's pre-alignment (DESIGN §3). The rule of `pseudo_preferences` with no constraint; the
    table carries no can metadata (so a DPO run on it needs its β given explicitly)."""
    cert = {"data": {"reward": column, "prompt_id": "prompt_id", "sha256": None}, "constraints": [], "beta": None,
            "lambda": {}}  # fmt: skip
    table, stats = pseudo_preferences(scores_path, cert, mode, pairs_per_prompt, seed, check_hash=False)
    return table.replace_schema_metadata(None), stats
