"""`can label` ③: pseudo-preference pairs from a scores table and its certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import ScoresArg, app, setup_jax
from train.cli.options import (
    FROM_CONFIG,
    ScorerBatchOpt,
    ScorerDtypeOpt,
    ScorerMaxLengthOpt,
    ScorerTemplateOpt,
    defaults_from,
)
from train.label import LabelConfig


@app.command()
@defaults_from(LabelConfig)
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
    ] = FROM_CONFIG,
    mode: Annotated[
        str, typer.Option(help="bt (sampled Bradley–Terry labels), soft (keep σ(Δs)) or hard.")
    ] = FROM_CONFIG,
    pairs_per_prompt: Annotated[
        int, typer.Option(help="Distinct random response pairs per prompt (at most K(K−1)/2; never repeated).")
    ] = FROM_CONFIG,
    seed: Annotated[int, typer.Option(help="Seed for pair choice and bt labels.")] = FROM_CONFIG,
    prompt_col: Annotated[str, typer.Option("--prompt-col", help="Prompt text column.")] = FROM_CONFIG,
    response_col: Annotated[str, typer.Option("--response-col", help="Response text column.")] = FROM_CONFIG,
    check_hash: Annotated[
        bool, typer.Option("--check-hash/--no-check-hash", help="Refuse a certificate made for another table.")
    ] = FROM_CONFIG,
    check_solution: Annotated[
        bool,
        typer.Option(
            "--check-solution/--no-check-solution",
            help="Re-evaluate the dual on the table and refuse a λ that is not its solution (an edited certificate).",
        ),
    ] = FROM_CONFIG,
    scorer: Annotated[
        Optional[list[str]],
        typer.Option(
            "--scorer",
            "-s",
            help="Pairs datasets: NAME=SPEC to compute scores the pairs lack (default: "
            "the scorers the certificate records).",
        ),
    ] = FROM_CONFIG,  # fmt: skip
    scorer_template: ScorerTemplateOpt = FROM_CONFIG,
    scorer_dtype: ScorerDtypeOpt = FROM_CONFIG,
    scorer_max_length: ScorerMaxLengthOpt = FROM_CONFIG,
    scorer_batch_size: ScorerBatchOpt = FROM_CONFIG,
):
    """Pseudo-preference pairs from a scores table and its certificate (labels from r + λ*ᵀg), ready for DPO.

    The output holds prompt, chosen, rejected, score_chosen, score_rejected and p_chosen, with β and λ* stored
    as metadata. Prompts with fewer than two responses are skipped and counted.

    SCORES may also be an existing pairs dataset — PKU-SafeRLHF's (prompt, response_0, response_1) or TRL's
    (prompt, chosen, rejected), text or conversational, Parquet/JSONL/CSV or a `datasets` directory: each pair is
    relabelled from r + λ*ᵀg, with the scores taken from its NAME_0/NAME_1 (or NAME_chosen/NAME_rejected) columns
    or computed by the scorers (the certificate's, or -s NAME=SPEC).
    """
    from train.label import run

    setup_jax()  # the solution check re-evaluates the dual in float64, as `can dual` solved it

    cfg = LabelConfig(scores=str(scores), certificate=str(certificate), out=str(out), mode=mode,
                      pairs_per_prompt=pairs_per_prompt, seed=seed, prompt_col=prompt_col, response_col=response_col,
                      check_hash=check_hash, check_solution=check_solution, scorer=list(scorer or []),
                      scorer_template=scorer_template, scorer_dtype=scorer_dtype, scorer_max_length=scorer_max_length,
                      scorer_batch_size=scorer_batch_size)  # fmt: skip
    prefs, stats = run(cfg)
    if prefs.record.get("source") == "pairs":
        ties = f", {stats.ties_dropped} tied pairs dropped" if stats.ties_dropped else ""
        if stats.identical_dropped:
            ties += f", {stats.identical_dropped} pairs with identical responses dropped"
        typer.echo(f"{stats.pairs} {mode} pairs relabelled from r + λ*ᵀg, written to {out} (β = {prefs.beta:g}); "
                   f"{stats.swapped} swapped sides{ties}")  # fmt: skip
        return
    typer.echo(
        f"{stats.pairs} {mode} pairs from {stats.prompts_used} prompts written to {out} (β = {prefs.beta:g}); "
        f"{stats.prompts_skipped} prompts with < 2 responses skipped"
        + (f", {stats.ties_dropped} tied pairs dropped" if stats.ties_dropped else "")
        + (f", {stats.rows_dropped} bad rows dropped (as `can dual --drop-bad-rows` did)" if stats.rows_dropped else "")
        + (
            f"; {stats.pairs_capped} prompts have fewer distinct pairs than --pairs-per-prompt: all of theirs are used"
            if stats.pairs_capped
            else ""
        )
    )
