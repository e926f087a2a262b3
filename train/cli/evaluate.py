"""`can evaluate` ⑤: achieved vs predicted gains."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import _console, _fail, _is_main_process, app
from train.cli.collect import DtypeOpt
from train.cli.options import ChatTemplateOpt, ScorerBatchOpt, ScorerDtypeOpt, ScorerMaxLengthOpt, ScorerTemplateOpt


@app.command("evaluate")
def evaluate_cmd(
    aligned: Annotated[str, typer.Argument(help="Aligned policy directory (e.g. RUN/policy from `can train`).")],
    certificate: Annotated[Path, typer.Argument(help="The certificate the alignment used.")],
    prompts: Annotated[Path, typer.Argument(help="Held-out prompts (.txt, one per line, or .jsonl).")],
    scorer: Annotated[list[str], typer.Option("--scorer", "-s", help="NAME=SPEC, as for `can collect`.")],
    reference: Annotated[str, typer.Option(help="Reference policy: a directory or 'smollm2'.")] = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for evaluation.md/.json/.png.")] = Path("can-eval"),
    k: Annotated[int, typer.Option("--k", help="Samples per prompt and policy.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of each response.")] = 48,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    chat_template: ChatTemplateOpt = True,
    scorer_template: ScorerTemplateOpt = "auto",
    scorer_dtype: ScorerDtypeOpt = "fp32",
    scorer_max_length: ScorerMaxLengthOpt = None,
    scorer_batch_size: ScorerBatchOpt = 16,
    dtype: DtypeOpt = "fp32",
    train_scores: Annotated[
        Optional[Path],
        typer.Option(
            help="The scores table the certificate was solved on: also report the aligned policy's gains on those "
            "samples (reweighted by π_aligned/π_ref), where the prediction was made."
        ),
    ] = None,
):
    """Achieved vs predicted: sample both policies on held-out prompts, score, compare gains with the certificate."""
    from bridge.certificate import read_certificate
    from can_jax.errors import CanError
    from train.collect import read_prompts
    from train.evaluate import evaluate, insample_gains
    from train.scorers import parse_scorer, scorer_options

    try:
        cert = read_certificate(certificate)
        insample = None
        if train_scores is not None:
            insample = insample_gains(aligned, train_scores, [parse_scorer(s)[0] for s in scorer], dtype=dtype)
        report = evaluate(aligned, reference, read_prompts(prompts), list(scorer), cert, out, k=k,
                          max_new_tokens=max_new_tokens, seed=seed, insample=insample, chat_template=chat_template,
                          scorer_options=scorer_options(scorer_template, scorer_dtype, scorer_max_length,
                                                        scorer_batch_size), dtype=dtype)  # fmt: skip
    except CanError as err:
        _fail(str(err))
    if _is_main_process():
        _print_evaluation(report)
        typer.echo(f"report written to {out / 'evaluation.md'}")


def _print_evaluation(report: dict):
    from rich.table import Table

    table = Table(title=f"achieved vs predicted gains on {report['prompts']} held-out prompts (β = {report['beta']:g})")
    for col in ("score", "role", "margin", "predicted", "on training samples", "achieved", "95% interval"):
        table.add_column(col, justify="left" if col in ("score", "role") else "right")
    for r in report["rows"]:
        table.add_row(r["name"], r["role"], "—" if r["margin"] is None else f"{r['margin']:+.3f}",
                      "—" if r["predicted_gain"] is None else f"{r['predicted_gain']:+.3f}",
                      "—" if r.get("insample_gain") is None else f"{r['insample_gain']:+.3f}",
                      f"{r['achieved_gain']:+.3f}", f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]")  # fmt: skip
    _console().print(table)
