"""Existing pairwise datasets relabelled with λ* (DESIGN §4): the authors' MoCAN relabels PKU-SafeRLHF's
(prompt, response_0, response_1) pairs, scored by the reward and cost models, with λ* solved on samples of π_ref.

A pairs dataset is PKU-style (`prompt`, `response_0`, `response_1`) or TRL-style (`prompt`, `chosen`,
`rejected`), text or conversational (a completion is then a list holding one assistant message), in Parquet,
JSON Lines, CSV or a `datasets` directory (`save_to_disk`). Scores come from its columns — `NAME_0`/`NAME_1`
(PKU) or `NAME_chosen`/`NAME_rejected` (TRL) for the reward and every constraint of the certificate — or are
computed by the scorers (`train.relabel`). Each pair is labelled from s = r + λ*ᵀg by the one rule of
`can_jax.labels`, a cost column negated exactly as `can dual` read it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bridge.files import sha256_file
from can_jax.errors import CanError, ScoresFormatError
from can_jax.labels import MODES

LAYOUTS = {"pku": ("response_0", "response_1", "_0", "_1"), "trl": ("chosen", "rejected", "_chosen", "_rejected")}


@dataclass(frozen=True)
class PairsStats:
    pairs: int
    swapped: int  # pairs whose chosen side is the dataset's second response (response_1 / rejected)
    ties_dropped: int
    identical_dropped: int = 0  # pairs whose two responses are the same text: nothing to prefer


PROMPT_ROLES = ("system", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")


def _row_problem(prompt, a, b) -> str | None:
    """What is wrong with one pair (prompt, first, second), or None: empty text, a message that is not
    {"role": str, "content": str}, a role out of place, text mixed with conversations."""

    def messages(value, what, roles):
        if not (isinstance(value, (list, tuple)) and value):
            return f"{what} is neither text nor a non-empty list of messages"
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"{what} has a message that is not {{'role': str, 'content': str}}: {m!r:.60}"
            if m["role"] not in roles:
                return f"{what} has a message with role {m['role']!r} (expected one of {', '.join(roles)})"
        return None

    if isinstance(prompt, str):
        if not prompt.strip():
            return "the prompt is empty"
    else:
        bad = messages(prompt, "the prompt", PROMPT_ROLES)
        if bad:
            return bad
        if prompt[-1]["role"] == "assistant":
            return "the prompt's last message has role 'assistant': a prompt ends with the user's turn"
        if not any(m["content"].strip() for m in prompt):
            return "the prompt is empty"
    for value, what in ((a, "the first response"), (b, "the second response")):
        if isinstance(value, str):
            if not isinstance(prompt, str):
                return f"{what} is text but the prompt is a conversation: give it as an assistant message"
            if not value.strip():
                return f"{what} is empty"
            continue
        if isinstance(prompt, str):
            return f"{what} is a list of messages but the prompt is text"
        bad = messages(value, what, COMPLETION_ROLES)
        if bad:
            return bad
        if value[0]["role"] != "assistant":
            return f"{what} starts with role {value[0]['role']!r}: a response starts with the assistant's turn"
        if not value[-1]["content"].strip():
            return f"{what} is empty"
    return None


def check_pairs(table: pa.Table, layout: str, where: str = "pairs") -> np.ndarray:
    """Refuses (one line naming the row, 0-based) a pair with an empty prompt or response, messages that are not
    {"role": str, "content": str}, roles out of place or text mixed with conversations. Returns the mask of pairs
    whose two responses are the same text (they are dropped and counted: there is nothing to prefer)."""
    a_col, b_col, _, _ = LAYOUTS[layout]
    prompts, firsts, seconds = (table.column(c).to_pylist() for c in ("prompt", a_col, b_col))
    same = np.zeros(table.num_rows, bool)
    for i, (p, a, b) in enumerate(zip(prompts, firsts, seconds, strict=True)):
        problem = _row_problem(p, a, b)
        if problem:
            raise ScoresFormatError(f"{where}: row {i} (0-based): {problem}")
        same[i] = completion_text(a).strip() == completion_text(b).strip()
    return same


def read_pairs(path: str | os.PathLike) -> tuple[pa.Table, str]:
    """(table, layout) of a pairwise dataset; layout is "pku" or "trl". Missing columns are named."""
    path = Path(path)
    if not path.exists():
        raise CanError(f"pairs dataset not found: {path}")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise CanError(f"{path} is a directory but not a `datasets` directory (save_to_disk)")
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
            if hasattr(ds, "keys"):
                ds = _one_split(ds, path)
            table = ds.with_format("arrow")[:]
        except CanError:
            raise
        except Exception as err:  # noqa: BLE001 — datasets raises many kinds on a damaged folder
            reason = " ".join(str(err).split())[:200]
            raise CanError(f"{path}: not a readable `datasets` directory ({type(err).__name__}: {reason}); save it "
                           "again with save_to_disk") from None  # fmt: skip
    else:
        from bridge.tables import read_table

        table = read_table(path)
    return _layout_of(table, path)


def _one_split(ds, path):
    """The only split of a DatasetDict, or its "train" split."""
    splits = list(ds.keys())
    if "train" not in splits and len(splits) != 1:
        raise CanError(f"{path} holds splits {splits}: save the one to relabel alone")
    return ds["train" if "train" in splits else splits[0]]


def _layout_of(table: pa.Table, path) -> tuple[pa.Table, str]:
    cols = set(table.column_names)
    for layout, (a, b, _, _) in LAYOUTS.items():
        if {"prompt", a, b} <= cols:
            if table.num_rows == 0:
                raise CanError(f"{path}: no pairs")
            return table, layout
    raise CanError(f"{path}: not a pairs dataset — {missing_pair_columns(cols)}")


NAMES = {"pku": "PKU-SafeRLHF layout", "trl": "TRL layout"}


def missing_pair_columns(cols) -> str:
    """Which columns a pairs dataset lacks, in the layout it comes closest to, with a near name it has ("did you
    mean"), and the columns it has."""
    import difflib

    cols = set(cols)
    need = {layout: ["prompt", a, b] for layout, (a, b, _, _) in LAYOUTS.items()}
    # the layout with the most of its columns present (PKU on a tie with none: the authors' MoCAN data)
    layout = max(need, key=lambda k: (len(cols & set(need[k])), k == "pku"))
    parts = []
    for name in (c for c in need[layout] if c not in cols):
        near = difflib.get_close_matches(name, sorted(cols), n=1, cutoff=0.6)
        parts.append(f"no column {name!r}" + (f" (is {near[0]!r} it, misspelt?)" if near else ""))
    other = next(k for k in need if k != layout)
    return (f"{'; '.join(parts)} for the {NAMES[layout]} ({', '.join(need[layout])}; or the {NAMES[other]}: "
            f"{', '.join(need[other])}); it has {sorted(cols)[:12]}")  # fmt: skip


def completion_text(value) -> str:
    """The text of a completion: itself, or the content of a conversational completion's last message."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise CanError(f"a completion is text or a list of messages, got {value!r:.80}")


def score_columns(name: str, layout: str) -> tuple[str, str]:
    """The two columns holding a score's values for the two responses, e.g. ("len_0", "len_1") or ("len_chosen",
    "len_rejected")."""
    _, _, sa, sb = LAYOUTS[layout]
    return name + sa, name + sb


def missing_scores(table: pa.Table, layout: str, cert) -> list[str]:
    """The score names whose two columns the table lacks."""
    _, _, sa, sb = LAYOUTS[layout]
    cols = set(table.column_names)
    return [n for n, _ in cert.score_weights() if not {n + sa, n + sb} <= cols]


def relabel(
    table: pa.Table,
    layout: str,
    cert,
    mode: str = "soft",
    seed: int = 0,
    scores: dict | None = None,
    where: str = "pairs",
) -> tuple[pa.Table, PairsStats]:
    """The pairs relabelled from s = r + λ*ᵀg. `scores` maps a name to its ([n], [n]) values for the two responses
    when they are not columns of the table. Output: prompt, chosen, rejected (as given: text or conversational),
    score_chosen, score_rejected, p_chosen (P(chosen ≻ rejected)), swapped (the second response was chosen)."""
    import jax

    from can_jax.labels import pair_targets

    if mode not in MODES:
        raise CanError(f"unknown labelling mode {mode!r}: use one of {', '.join(MODES)}")
    a_col, b_col, sa, sb = LAYOUTS[layout]
    same = check_pairs(table, layout, where)
    scores = dict(scores or {})
    s = np.zeros((2, table.num_rows))
    for name, weight in cert.score_weights():
        if name in scores:
            pair = [np.asarray(v, float) for v in scores[name]]
        else:
            if not {name + sa, name + sb} <= set(table.column_names):
                raise ScoresFormatError(f"{where}: no scores for {name!r}: give columns {name + sa!r} and "
                                        f"{name + sb!r}, or the scorers to compute them")  # fmt: skip
            pair = [np.asarray(table.column(name + x).to_numpy(zero_copy_only=False), float) for x in (sa, sb)]
        for side in (0, 1):
            bad = np.flatnonzero(~np.isfinite(pair[side]))
            if bad.size:
                raise ScoresFormatError(f"{where}: NaN/inf {name!r} scores of the {'first' if side == 0 else 'second'} "
                                        f"response in rows {bad[:8].tolist()} (0-based)")  # fmt: skip
            s[side] += weight * pair[side]
    target = np.asarray(pair_targets(jax.random.key(seed), s[0], s[1], mode), float)  # P(first ≻ second)
    keep = ~same
    if mode == "hard":
        keep &= s[0] != s[1]
    if not keep.any():
        raise CanError(f"{where}: no pair left to label ({int(same.sum())} with identical responses"
                       + (", the others tied" if mode == "hard" else "") + ")")  # fmt: skip
    first_wins = target >= 0.5
    rows = np.flatnonzero(keep)
    take = pa.array(rows)
    first, second = table.column(a_col).take(take), table.column(b_col).take(take)
    win = pa.array(first_wins[rows])
    chosen = pa.compute.if_else(win, first, second)
    rejected = pa.compute.if_else(win, second, first)
    s_c = np.where(first_wins, s[0], s[1])[rows]
    s_r = np.where(first_wins, s[1], s[0])[rows]
    p = np.where(first_wins, target, 1.0 - target)[rows] if mode == "soft" else 1.0 / (1.0 + np.exp(-(s_c - s_r)))
    out = pa.table({"prompt": table.column("prompt").take(take), "chosen": chosen, "rejected": rejected,
                    "score_chosen": s_c, "score_rejected": s_r, "p_chosen": p,
                    "swapped": ~first_wins[rows]})  # fmt: skip
    return out, PairsStats(len(rows), int((~first_wins[rows]).sum()), int((~keep & ~same).sum()), int(same.sum()))


def pairs_meta(mode: str, seed: int, pairs_path) -> dict:
    """What a relabelled dataset records of where it came from (β and λ* are its certificate's)."""
    path = Path(pairs_path)
    return {"mode": mode, "seed": seed, "source": "pairs", "pairs": str(path),
            "pairs_sha256": sha256_file(path) if path.is_file() else None}  # fmt: skip


def looks_like_pairs(path: str | os.PathLike, response_col: str = "response") -> bool:
    """Whether `path` is a pairs dataset (two responses per row) rather than a scores table (one per row, in
    `response_col`)."""
    from bridge.tables import ScoresFile

    if isinstance(path, ScoresFile):
        return is_pairs_columns(path.table.column_names, response_col)
    path = Path(path)
    if path.is_dir():
        return (path / "dataset_info.json").exists() or (path / "state.json").exists()
    if not path.is_file():
        return False
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            cols = set(pq.read_schema(path).names)
        else:
            from bridge.tables import read_table

            cols = set(read_table(path).column_names)
    except Exception:  # unreadable as a table: judge by the first record's names, the reader then says why
        cols = _first_record_names(path)
    return is_pairs_columns(cols, response_col)


PAIR_COLUMNS = {c for a, b, _, _ in LAYOUTS.values() for c in (a, b)}


def is_pairs_columns(cols, response_col: str = "response") -> bool:
    """Columns of a pairs dataset — one response column of either layout and no single response column — even with
    the other misspelt or missing: the pairs reader then names it (never a scores table's hash check)."""
    cols = set(cols)
    return response_col not in cols and bool(cols & PAIR_COLUMNS)


def _first_record_names(path: Path) -> set:
    """The field names of a JSON Lines file's first record, or a CSV file's header (empty when unreadable)."""
    import csv
    import json

    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix in (".jsonl", ".json"):
                line = next((ln for ln in f if ln.strip()), "{}")
                row = json.loads(line)
                return set(row) if isinstance(row, dict) else set()
            if path.suffix == ".csv":
                return set(next(csv.reader(f), []))
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return set()
