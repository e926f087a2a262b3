"""Existing pairwise datasets relabelled with λ* (DESIGN §4; issue 10): the authors' MoCAN relabels PKU-SafeRLHF's
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


def read_pairs(path: str | os.PathLike) -> tuple[pa.Table, str]:
    """(table, layout) of a pairwise dataset; layout is "pku" or "trl". Missing columns are named."""
    path = Path(path)
    if not path.exists():
        raise CanError(f"pairs dataset not found: {path}")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise CanError(f"{path} is a directory but not a `datasets` directory (save_to_disk)")
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # a DatasetDict: take its only split, or "train"
            splits = list(ds.keys())
            if "train" not in splits and len(splits) != 1:
                raise CanError(f"{path} holds splits {splits}: save the one to relabel alone")
            ds = ds["train" if "train" in splits else splits[0]]
        table = ds.with_format("arrow")[:]
    else:
        from bridge.tables import read_table

        table = read_table(path)
    cols = set(table.column_names)
    for layout, (a, b, _, _) in LAYOUTS.items():
        if {"prompt", a, b} <= cols:
            if table.num_rows == 0:
                raise CanError(f"{path}: no pairs")
            return table, layout
    pku = sorted({"prompt", "response_0", "response_1"} - cols)
    trl = sorted({"prompt", "chosen", "rejected"} - cols)
    raise CanError(f"{path}: not a pairs dataset — missing {pku} (PKU-SafeRLHF layout) or {trl} (TRL layout); "
                   f"it has {sorted(cols)[:12]}")  # fmt: skip


def completion_text(value) -> str:
    """The text of a completion: itself, or the content of a conversational completion's last message."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise CanError(f"a completion is text or a list of messages, got {value!r:.80}")


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
    keep = np.ones(table.num_rows, bool)
    if mode == "hard":
        keep = s[0] != s[1]
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
    return out, PairsStats(len(rows), int((~first_wins[rows]).sum()), int((~keep).sum()))


def pairs_meta(mode: str, seed: int, pairs_path) -> dict:
    """What a relabelled dataset records of where it came from (β and λ* are its certificate's)."""
    path = Path(pairs_path)
    return {"mode": mode, "seed": seed, "source": "pairs", "pairs": str(path),
            "pairs_sha256": sha256_file(path) if path.is_file() else None}  # fmt: skip


def looks_like_pairs(path: str | os.PathLike) -> bool:
    """Whether `path` is a pairs dataset (two responses per row) rather than a scores table (one per row)."""
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
    except Exception:  # unreadable: let the scores-table reader say why
        return False
    return "response" not in cols and any({a, b} <= cols for a, b, _, _ in LAYOUTS.values())
