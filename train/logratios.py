"""PeCAN's columns (DESIGN §3): for samples of π_ref, each pre-aligned model's β·log-ratio, log-prob and
token-level KL — recorded by `can collect --aligned`, or added to a table already sampled by `can logratios`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from bridge.scores_table import collect_record, write_scores_table
from can_jax.errors import CanError, at_least_one
from train.prompts import ensure_file_parent, table_ids

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


@dataclass(frozen=True)
class LogratiosConfig:
    """PeCAN's columns for samples already drawn (`can logratios`): the pre-aligned models and how their log-probs
    are computed."""

    aligned: list  # NAME=DIR or NAME=DIR@BETA (`can prealign` outputs)
    out: str = "pecan.parquet"
    policy: str = "smollm2"  # the reference policy the samples came from
    max_length: int | None = None  # token limit of prompt + response (as in DPO); None: uncut
    batch_size: int = 16
    dtype: str = "fp32"


def add_aligned(cfg: LogratiosConfig, table_path: str | os.PathLike) -> Path:
    """PeCAN's columns for the responses of an existing table of π_ref samples (e.g. a MoCAN collection): no new
    sampling, so MoCAN and PeCAN see the same responses. Writes cfg.out atomically and returns it."""
    aligned, out, policy, max_length, batch_size, dtype = (cfg.aligned, cfg.out, cfg.policy, cfg.max_length,
                                                           cfg.batch_size, cfg.dtype)  # fmt: skip
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
    ids = table_ids(table)

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
