"""`can label` ③: pseudo-preference pairs from a scores table and its certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import ScoresArg, _fail, app
from train.cli.options import ScorerBatchOpt, ScorerDtypeOpt, ScorerMaxLengthOpt, ScorerTemplateOpt


@app.command()
def label(
    scores: ScoresArg,
    certificate: Annotated[Path, typer.Argument(help="Certificate JSON written by `can dual --out`.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Preference dataset to write: .parquet, or a folder (a `datasets` directory with certificate.json).",
        ),
    ] = Path("preferences.parquet"),
    mode: Annotated[str, typer.Option(help="bt (sampled Bradley–Terry labels), soft (keep σ(Δs)) or hard.")] = "bt",
    pairs_per_prompt: Annotated[
        int, typer.Option(help="Distinct random response pairs per prompt (at most K(K−1)/2; never repeated).")
    ] = 1,
    seed: Annotated[int, typer.Option(help="Seed for pair choice and bt labels.")] = 0,
    prompt_col: Annotated[str, typer.Option("--prompt-col", help="Prompt text column.")] = "prompt",
    response_col: Annotated[str, typer.Option("--response-col", help="Response text column.")] = "response",
    check_hash: Annotated[
        bool, typer.Option("--check-hash/--no-check-hash", help="Refuse a certificate made for another table.")
    ] = True,
    scorer: Annotated[
        Optional[list[str]],
        typer.Option(
            "--scorer",
            "-s",
            help="Pairs datasets: NAME=SPEC to compute scores the pairs lack (default: "
            "the scorers the certificate records).",
        ),
    ] = None,  # fmt: skip
    scorer_template: ScorerTemplateOpt = "auto",
    scorer_dtype: ScorerDtypeOpt = "fp32",
    scorer_max_length: ScorerMaxLengthOpt = None,
    scorer_batch_size: ScorerBatchOpt = 16,
):
    """Pseudo-preference pairs from a scores table and its certificate (labels from r + λ*ᵀg), ready for DPO.

    The output holds prompt, chosen, rejected, score_chosen, score_rejected and p_chosen, with β and λ* stored
    as metadata. Prompts with fewer than two responses are skipped and counted.

    SCORES may also be an existing pairs dataset — PKU-SafeRLHF's (prompt, response_0, response_1) or TRL's
    (prompt, chosen, rejected), text or conversational, Parquet/JSONL/CSV or a `datasets` directory: each pair is
    relabelled from r + λ*ᵀg, with the scores taken from its NAME_0/NAME_1 (or NAME_chosen/NAME_rejected) columns
    or computed by the scorers (the certificate's, or -s NAME=SPEC).
    """
    from bridge.certificate import read_certificate
    from bridge.labels import pseudo_preferences
    from bridge.outputs import write_preference_outputs
    from bridge.pairs import looks_like_pairs
    from can_jax.errors import CanError

    if looks_like_pairs(scores):
        from train.relabel import relabel_pairs
        from train.scorers import scorer_options

        try:
            cert = read_certificate(certificate)
            opts = scorer_options(scorer_template, scorer_dtype, scorer_max_length, scorer_batch_size)
            table, stats = relabel_pairs(scores, cert, mode, seed, list(scorer or []), opts)
        except CanError as err:
            _fail(str(err))
        try:
            write_preference_outputs(out, table, cert)
        except CanError as err:
            _fail(str(err))
        ties = f", {stats.ties_dropped} tied pairs dropped" if stats.ties_dropped else ""
        typer.echo(f"{stats.pairs} {mode} pairs relabelled from r + λ*ᵀg, written to {out} (β = {cert['beta']:g}); "
                   f"{stats.swapped} swapped sides{ties}")  # fmt: skip
        return
    try:
        cert = read_certificate(certificate)
        table, stats = pseudo_preferences(scores, cert, mode, pairs_per_prompt, seed, prompt_col, response_col,
                                          check_hash)  # fmt: skip
    except CanError as err:
        _fail(str(err))
    try:
        write_preference_outputs(out, _with_tokenizer(table, scores), cert)
    except CanError as err:
        _fail(str(err))
    typer.echo(
        f"{stats.pairs} {mode} pairs from {stats.prompts_used} prompts written to {out} (β = {cert['beta']:g}); "
        f"{stats.prompts_skipped} prompts with < 2 responses skipped"
        + (f", {stats.ties_dropped} tied pairs dropped" if stats.ties_dropped else "")
        + (f", {stats.rows_dropped} bad rows dropped (as `can dual --drop-bad-rows` did)" if stats.rows_dropped else "")
        + (
            f"; {stats.pairs_capped} prompts have fewer distinct pairs than --pairs-per-prompt: all of theirs are used"
            if stats.pairs_capped
            else ""
        )
    )


def _with_tokenizer(table, scores_path):
    """The pairs' metadata gains the collection tokenizer's fingerprint (`can train` refuses sampled ids from
    another tokenizer)."""
    import json

    import pyarrow.parquet as pq

    from bridge.labels import META_KEY

    try:
        collected = json.loads((pq.read_schema(scores_path).metadata or {}).get(b"can.collect", b"{}"))
    except Exception:  # not a Parquet table from `can collect`: nothing to carry
        return table
    if "tokenizer_sha256" not in collected or META_KEY not in (table.schema.metadata or {}):
        return table
    meta = {**json.loads(table.schema.metadata[META_KEY]), "tokenizer_sha256": collected["tokenizer_sha256"]}
    return table.replace_schema_metadata({**table.schema.metadata, META_KEY: json.dumps(meta).encode()})
