"""`can evaluate` ⑤: achieved vs predicted gains."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bridge.reports import cell
from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, console, fail, is_main_process
from train.cli.collect import DtypeOpt
from train.cli.launch import launch_if_asked
from train.cli.options import (
    FROM_CONFIG,
    SCORER_OPTIONS,
    ChatTemplateOpt,
    ScorerBatchOpt,
    ScorerDtypeOpt,
    ScorerMaxLengthOpt,
    ScorerTemplateOpt,
    defaults_from,
)
from train.evaluate import EvaluateConfig
from train.scorers import ScorerOptions


@app.command("evaluate")
@defaults_from(EvaluateConfig, rename={"scorer": "scorers", **SCORER_OPTIONS})
def evaluate_cmd(
    aligned: Annotated[str, typer.Argument(help="Aligned policy directory (e.g. RUN/policy from `can train`).")],
    certificate_or_prompts: Annotated[
        Path,
        typer.Argument(
            metavar="[CERTIFICATE] PROMPTS",
            help="Held-out prompts (.txt, one per line, or .jsonl). The certificate comes from the policy folder "
            "(`can train` writes it beside the weights); naming one first (CERTIFICATE PROMPTS) checks it is that "
            "one, or supplies it for a policy aligned elsewhere.",
            show_default=False,
        ),
    ],
    prompts: Annotated[Optional[Path], typer.Argument(hidden=True, show_default=False)] = None,
    scorer: Annotated[
        Optional[list[str]], typer.Option("--scorer", "-s", help="NAME=SPEC, as for `can collect` (required).")
    ] = None,
    reference: Annotated[str, typer.Option(help="Reference policy: a directory or 'smollm2'.")] = FROM_CONFIG,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for evaluation.md/.json/.png.")] = FROM_CONFIG,
    k: Annotated[int, typer.Option("--k", help="Samples per prompt and policy.")] = FROM_CONFIG,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of each response.")] = FROM_CONFIG,
    batch_size: Annotated[int, typer.Option(help="Sequences (prompts × K) per sampling batch.")] = FROM_CONFIG,
    seed: Annotated[int, typer.Option(help="Random seed.")] = FROM_CONFIG,
    chat_template: ChatTemplateOpt = FROM_CONFIG,
    scorer_template: ScorerTemplateOpt = FROM_CONFIG,
    scorer_dtype: ScorerDtypeOpt = FROM_CONFIG,
    scorer_max_length: ScorerMaxLengthOpt = FROM_CONFIG,
    scorer_batch_size: ScorerBatchOpt = FROM_CONFIG,
    dtype: DtypeOpt = FROM_CONFIG,
    reuse_reference: Annotated[
        bool,
        typer.Option(
            "--reuse-reference/--no-reuse-reference",
            help="Keep π_ref's samples and scores on these prompts in $CAN_CACHE_DIR/reference-samples, under the hash "
            "of the reference's files, the prompts, the sampling settings, the scorers and the code, and read them "
            "back when a later run has the same (CAN_NO_CACHE=1 turns it off too).",
        ),
    ] = FROM_CONFIG,
    train_scores: Annotated[
        Optional[Path],
        typer.Option(
            help="The scores table the certificate was solved on: also report the aligned policy's gains on those "
            "samples (reweighted by π_aligned/π_ref), where the prediction was made."
        ),
    ] = None,
    allow_training_prompts: Annotated[
        bool,
        typer.Option(
            "--allow-training-prompts",
            help="Measure on prompts that are training prompts of --train-scores (refused otherwise): held-out "
            "gains must come from prompts DPO did not see, so gains on these read too high.",
        ),
    ] = False,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """Achieved vs predicted: sample both policies on held-out prompts, score, compare gains with the certificate."""
    launch_if_asked(num_processes, accelerate_config)
    from train.evaluate import check_held_out, check_policy_folder, insample_gains, run
    from train.prompts import check_sampling, read_prompts
    from train.scorers import check_scorer_specs, check_scorers, parse_scorer

    if not scorer:
        fail("give the scorers: -s NAME=SPEC for the reward and every constraint (as for `can collect`)")
    certificate, prompts = (None, certificate_or_prompts) if prompts is None else (certificate_or_prompts, prompts)
    check_policy_folder(aligned)
    cert = policy_certificate(aligned, certificate)
    check_sampling(k, max_new_tokens, batch_size, "--k")
    ecfg = EvaluateConfig(aligned=aligned, reference=reference, scorers=tuple(scorer), out=str(out), k=k,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, chat_template=chat_template,
                          scorer_options=ScorerOptions(scorer_template, scorer_dtype, scorer_max_length,
                                                       scorer_batch_size), dtype=dtype,
                          reuse_reference=reuse_reference)  # fmt: skip
    # Every input is checked before any model is loaded: the scorers against the certificate (the gains of another
    # scorer under a constraint's name would compare another quantity with its prediction), the prompts against the
    # training table.
    check_scorers(cert, [parse_scorer(s)[0] for s in scorer])
    check_scorer_specs(cert, [parse_scorer(s) for s in scorer])
    held_out = read_prompts(prompts)
    if train_scores is not None and not allow_training_prompts:
        check_held_out(held_out, train_scores)
    insample = None
    if train_scores is not None:
        from bridge.tables import read_table
        from can_jax.errors import CanError

        try:
            table = read_table(train_scores)
        except CanError as err:
            fail(f"--train-scores: {err}")
        insample = insample_gains(aligned, table, [parse_scorer(s)[0] for s in scorer], dtype=dtype)
    report = run(ecfg, cert, held_out, insample)
    if is_main_process():
        print_evaluation(report)
        typer.echo(f"report written to {out / 'evaluation.md'}")


def policy_certificate(aligned: str, certificate: Path | None):
    """The certificate of an aligned policy: the one its folder carries, checked against CERTIFICATE when given;
    CERTIFICATE alone for a policy aligned elsewhere."""
    from pathlib import Path as _Path

    from bridge.certificate import Certificate, read_beside
    from can_jax.errors import CanError

    carried = read_beside(aligned) if _Path(aligned).is_dir() else None
    given = None if certificate is None else Certificate.read(certificate)
    if carried is None and given is None:
        raise CanError(f"{aligned} carries no certificate.json (was it trained by `can train`?): name the certificate "
                       "it was aligned under: can evaluate POLICY CERTIFICATE PROMPTS ...")  # fmt: skip
    if carried is not None and given is not None and carried.sha256 != given.sha256:
        raise CanError(f"{certificate} is not the certificate {aligned} was aligned under (its certificate.json has "
                       f"λ* {carried.lam}, β = {carried.beta:g}): drop it, or evaluate the policy it "
                       "belongs to")  # fmt: skip
    return carried if carried is not None else given


def print_evaluation(report):
    """An `EvaluationReport` as a table, its note and its text check."""
    from rich.table import Table

    table = Table(title=f"achieved vs predicted gains on {report.prompts} held-out prompts (β = {report.beta:g})")
    for col in ("score", "role", "margin", "predicted", "on training samples", "achieved", "95% interval"):
        table.add_column(col, justify="left" if col in ("score", "role") else "right")
    for r in report.rows:
        table.add_row(r.name, r.role, cell(r.margin), cell(r.predicted_gain), cell(r.insample_gain),
                      f"{r.achieved_gain:+.3f}", f"[{r.ci95[0]:+.3f}, {r.ci95[1]:+.3f}]")  # fmt: skip
    console().print(table)
    if report.note:
        console().print(f"[yellow]note:[/] {report.note}")
    text = report.text
    if text:
        d, lp = text["distinct_2"], text["logp_ref_per_token"]
        console().print(f"text check: distinct-2 {d['aligned']:.3f} aligned / {d['reference']:.3f} reference; "
                        f"log π_ref per token {lp['aligned']:+.3f} / {lp['reference']:+.3f}; "
                        f"KL ≈ {text['kl']:.2f} nats per response")  # fmt: skip
