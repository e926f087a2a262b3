"""Pseudo-preference datasets from a scores table and its dual certificate (DESIGN §4, §8; `can label`).

Each prompt's sampled responses are paired at random (distinct pairs: never the same pair twice); the pair is
labelled from s = r + λ*ᵀg by the one rule in `can_jax.labels` (bt, soft or hard). The output is a TRL-ready
preference table — prompt, chosen, rejected — with score_chosen, score_rejected and p_chosen (the Bradley–Terry
probability that chosen ≻ rejected, the soft target), and the certificate's β and λ* in the file's metadata, so a
GPU job needs nothing else. A conversational prompt keeps its messages, and the responses become assistant turns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bridge.scores_table import collect_record
from bridge.tables import (
    ScoresFile,
    bad_rows,
    check_one_prompt_per_id,
    group_prompts,
    prompt_keys,
    read_table,
    scores_sha256,
)
from can_jax.errors import CanError, ScoresFormatError
from can_jax.labels import MODES


@dataclass(frozen=True)
class LabelStats:
    pairs: int
    prompts_used: int
    prompts_skipped: int  # fewer than two responses
    ties_dropped: int  # hard mode: equal scores have no chosen side
    pairs_capped: int = 0  # prompts with fewer distinct pairs than --pairs-per-prompt: all of theirs are used
    rows_dropped: int = 0  # bad rows dropped by the certificate's --drop-bad-rows rule


def signed_scores(table: pa.Table, weights: list[tuple[str, float]]) -> np.ndarray:
    """Σ weight · column per row, the reward (weight 1) first: the one computation of s = r + λᵀg."""
    (reward, _), *terms = weights
    s = np.asarray(table.column(reward).to_numpy(zero_copy_only=False), float).copy()
    for name, weight in terms:
        s += weight * np.asarray(table.column(name).to_numpy(zero_copy_only=False), float)
    return s


def pseudo_preferences(
    scores_path: str | os.PathLike,
    cert,
    mode: str = "bt",
    pairs_per_prompt: int = 1,
    seed: int = 0,
    prompt_col: str = "prompt",
    response_col: str = "response",
    check_hash: bool = True,
    check_solution: bool = True,
):
    """The preference set of a scores table and its `Certificate`: per prompt, `pairs_per_prompt` distinct pairs
    of distinct responses (all of a prompt's K(K−1)/2 pairs where it has fewer; counted in `pairs_capped`), labelled
    from s = r + λ*ᵀg. Returns (`PreferenceSet`, `LabelStats`).

    With `check_hash` the table must be the one the certificate was solved on; with `check_solution` its λ is also
    re-checked as the dual's solution on this table (a hand-edited β or λ is refused). Rows `can dual
    --drop-bad-rows` dropped are dropped again; one prompt id must carry one prompt.
    """
    from bridge.dual import check_solution as kkt_check
    from bridge.preferences import PreferenceSet

    check_label_options(mode, pairs_per_prompt)
    _check_source(scores_path)
    if check_hash and scores_sha256(scores_path) != cert.scores_sha256:
        raise CanError(
            f"the certificate was computed on another scores table (sha256 {str(cert.scores_sha256)[:12]}…, "
            f"{scores_path} has another); re-run `can dual` on this table or pass --no-check-hash"
        )
    table = read_table(scores_path)
    weights = cert.score_weights()
    _require(table, [cert.prompt_id, prompt_col, response_col, *(n for n, _ in weights)], scores_path)
    if check_solution:
        kkt_check(scores_path, cert)
    refs = [c for c in cert.reference_columns.values() if c in table.column_names]
    out, stats = _label(table, str(scores_path), weights, cert.prompt_id, refs, cert.drops_bad_rows, mode,
                        pairs_per_prompt, seed, prompt_col, response_col)  # fmt: skip
    record = {"mode": mode, "pairs_per_prompt": pairs_per_prompt, "seed": seed, "pairs_capped": stats.pairs_capped,
              "rows_dropped": stats.rows_dropped}  # fmt: skip
    collected = collect_record(table)
    if collected.tokenizer_sha256 and "chosen_ids" in out.column_names:
        record["tokenizer_sha256"] = collected.tokenizer_sha256  # `can train` refuses ids of another tokenizer
    return PreferenceSet(out, record, cert), stats


def score_preferences(
    scores_path: str | os.PathLike, column: str, pairs_per_prompt: int = 1, seed: int = 0, mode: str = "hard"
) -> tuple[pa.Table, LabelStats]:
    """Preference pairs labelled by one score column alone — a stand-in for human preference data on one aspect,
    the input of PeCAN's pre-alignment (DESIGN §3). The rule of `pseudo_preferences` with no constraint; a plain
    table without can metadata (so a DPO run on it needs its β given explicitly)."""
    check_label_options(mode, pairs_per_prompt)
    table = read_table(scores_path)
    _require(table, ["prompt_id", "prompt", "response", column], scores_path)
    return _label(table, str(scores_path), [(column, 1.0)], "prompt_id", [], False, mode, pairs_per_prompt, seed,
                  "prompt", "response")  # fmt: skip


def check_label_options(mode: str, pairs_per_prompt: int) -> None:
    """Refuses an unknown labelling mode or fewer than one pair per prompt (`can label`, and `can refine` up front)."""
    if mode not in MODES:
        raise CanError(f"unknown labelling mode {mode!r}: use one of {', '.join(MODES)}")
    if pairs_per_prompt < 1:
        raise CanError("--pairs-per-prompt must be at least 1")


def _check_source(path) -> None:
    from pathlib import Path

    if isinstance(path, ScoresFile):  # read already
        return
    path = Path(path)
    if path.is_dir():
        raise CanError(f"{path} is a directory but neither a scores table nor a `datasets` directory of pairs "
                       "(save_to_disk writes state.json and dataset_info.json)")  # fmt: skip
    if not path.exists():
        raise CanError(f"scores table not found: {path}")


def _require(table: pa.Table, needed: list[str], where) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ScoresFormatError(f"{where}: missing column(s) {missing} needed for labels")


def _label(table, where: str, weights, pid_col: str, refs: list[str], drops_bad: bool, mode: str,
           pairs_per_prompt: int, seed: int, prompt_col: str, response_col: str):  # fmt: skip
    """(pairs table, LabelStats) of one table under s = Σ weight · column (the reward first)."""
    import jax

    from can_jax.labels import pair_targets

    # The certificate's bad-row rule, on the same columns `can dual` checked (plus the prompt column used here).
    (reward, _), *terms = weights
    keys, empty = prompt_keys(table.column(prompt_col), prompt_col)
    bad = bad_rows(table, reward, [n for n, _ in terms], pid_col, refs) | empty
    if bad.any() and not drops_bad:
        rows = np.flatnonzero(bad)
        raise ScoresFormatError(
            f"{where}: {rows.size} row(s) with NaN/inf/missing scores, a missing prompt id or an empty prompt "
            f"(rows {rows[:8].tolist()}, 0-based), and the certificate was not made with --drop-bad-rows"
        )
    keep = np.flatnonzero(~bad)
    check_one_prompt_per_id(table.column(pid_col).take(pa.array(keep)), keys[keep], where, pid_col, prompt_col)
    s = signed_scores(table, weights)

    # Rows of each prompt, grouped (kept rows only); ids numbered by first appearance.
    index, _ = group_prompts(pa.chunked_array(table.column(pid_col)).take(pa.array(keep)))
    order = keep[np.argsort(index, kind="stable")]
    counts = np.bincount(index) if index.size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    usable = np.flatnonzero(counts >= 2)
    if usable.size == 0:
        raise CanError(f"{where}: no prompt has two usable responses: there is nothing to pair")
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
        # `can train` skips its reference pass with them
        if "logp_ref" in table.column_names and collect_record(table).logp_ref_exact:
            cols["logp_ref_chosen"] = table.column("logp_ref").take(pa.array(chosen))
            cols["logp_ref_rejected"] = table.column("logp_ref").take(pa.array(rejected))
    out = pa.table(cols)
    stats = LabelStats(len(chosen), len(usable), int((counts < 2).sum()), ties, capped, int(bad.sum()))
    return out, stats


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
