"""`can refine` ⑥: correction rounds until the achieved gains reach the margins."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.chain import RefineConfig
from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, fail, is_main_process, setup_jax
from train.cli.collect import DtypeOpt
from train.cli.launch import launch_if_asked
from train.cli.options import (
    FROM_CONFIG,
    SCORER_OPTIONS,
    ChatTemplateOpt,
    EtaOpt,
    ScorerBatchOpt,
    ScorerDtypeOpt,
    ScorerMaxLengthOpt,
    ScorerTemplateOpt,
    SecantOpt,
    StartOpt,
    StepOpt,
    defaults_from,
)
from train.cli.train import BatchOpt, EpochsOpt, LoraOpt, LrOpt, MaxLengthOpt, PrecisionOpt, TrainTopOpt
from train.scorers import ScorerOptions
from train.settings import DPOSettings


@app.command("refine")
@defaults_from(RefineConfig, DPOSettings,
               rename={"scorer": "scorers", "dpo_seed": (DPOSettings, "seed"), **SCORER_OPTIONS})  # fmt: skip
def refine_cmd(
    policy: Annotated[str, typer.Argument(help="Round 0's aligned policy (RUN/policy from `can train`).")],
    scores: Annotated[
        Path, typer.Option("--scores", help="The π_ref samples its certificate was solved on (`can collect`'s table).")
    ],
    prompts: Annotated[
        Path,
        typer.Option(
            "--prompts",
            help="Calibration prompts (.txt or .jsonl): they steer λ, so keep them apart from the training prompts "
            "and from the prompts you judge the result on (a training or test prompt here, or a repeat, is refused).",
        ),
    ],
    scorer: Annotated[
        Optional[list[str]], typer.Option("--scorer", "-s", help="NAME=SPEC, as for `can collect` (required).")
    ] = None,
    reference: Annotated[str, typer.Option(help="Reference policy π_ref: a directory or 'smollm2'.")] = FROM_CONFIG,
    certificate: Annotated[
        Optional[Path], typer.Option(help="Round 0's certificate [default: the one the policy folder carries].")
    ] = FROM_CONFIG,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the rounds (round-N/, rounds.md).")] = FROM_CONFIG,
    rounds: Annotated[int, typer.Option(help="Correction rounds at most (a rerun with more continues).")] = FROM_CONFIG,
    step: StepOpt = FROM_CONFIG,
    eta: EtaOpt = FROM_CONFIG,
    secant: SecantOpt = FROM_CONFIG,
    start: StartOpt = FROM_CONFIG,
    test_prompts: Annotated[
        Optional[Path],
        typer.Option(help="Held-out prompts measured every round for the table (never used to steer or stop)."),
    ] = FROM_CONFIG,
    k: Annotated[int, typer.Option("--k", help="Samples per calibration prompt and policy.")] = FROM_CONFIG,
    test_k: Annotated[
        Optional[int], typer.Option("--test-k", help="Samples per test prompt and policy [default: as --k].")
    ] = FROM_CONFIG,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of each response.")] = FROM_CONFIG,
    gen_batch_size: Annotated[int, typer.Option(help="Sequences (prompts × K) per sampling batch.")] = FROM_CONFIG,
    seed: Annotated[int, typer.Option(help="Sampling seed of the calibration measurements.")] = FROM_CONFIG,
    test_seed: Annotated[int, typer.Option(help="Sampling seed of the test measurements.")] = FROM_CONFIG,
    floor: Annotated[float, typer.Option(help="The stopping rule's smallest tolerance around a margin.")] = FROM_CONFIG,
    level: Annotated[
        float, typer.Option(help="Joint confidence level of the m intervals the rule judges with.")
    ] = FROM_CONFIG,
    mode: Annotated[str, typer.Option(help="Label mode of the relabelled samples, as `can label`.")] = FROM_CONFIG,
    pairs_per_prompt: Annotated[int, typer.Option(help="Pairs per prompt, as `can label`.")] = FROM_CONFIG,
    label_seed: Annotated[int, typer.Option(help="Seed for pair choice and bt labels.")] = FROM_CONFIG,
    epochs: EpochsOpt = FROM_CONFIG,
    lr: LrOpt = FROM_CONFIG,
    batch_size: BatchOpt = FROM_CONFIG,
    max_length: MaxLengthOpt = FROM_CONFIG,
    train_top: TrainTopOpt = FROM_CONFIG,
    lora: LoraOpt = FROM_CONFIG,
    precision: PrecisionOpt = FROM_CONFIG,
    dpo_seed: Annotated[Optional[int], typer.Option()] = FROM_CONFIG,
    chat_template: ChatTemplateOpt = FROM_CONFIG,
    scorer_template: ScorerTemplateOpt = FROM_CONFIG,
    scorer_dtype: ScorerDtypeOpt = FROM_CONFIG,
    scorer_max_length: ScorerMaxLengthOpt = FROM_CONFIG,
    scorer_batch_size: ScorerBatchOpt = FROM_CONFIG,
    dtype: DtypeOpt = FROM_CONFIG,
    insample: Annotated[
        bool,
        typer.Option(
            "--insample/--no-insample",
            help="Also each round's gains on the training samples (reweighted by π/π_ref: a log-prob pass).",
        ),
    ] = FROM_CONFIG,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """Correction rounds: measure the aligned policy's gains on calibration prompts, step λ, relabel the original
    π_ref samples under the round's certificate, run DPO again — until the gains reach the margins.

    Each round: sample the policy and π_ref on the calibration prompts and score them (as `can evaluate`); stop if
    every active constraint's gain is within max(FLOOR, h) of its margin and every slack one at least its margin
    less that (h: half-width of the simultaneous intervals over the m constraints); else take the step, write
    OUT/round-N/certificate.json (linked to the previous round's by hash), label, train. Give the label and DPO
    options of the one-shot run. A killed run resumes when run again with the same command; several GPUs:
    `--num-processes N`.
    """
    launch_if_asked(num_processes, accelerate_config)
    if not scorer:
        fail("give the scorers: -s NAME=SPEC for the reward and every constraint (as for `can collect`)")
    setup_jax()
    from train.prompts import read_prompts
    from train.refine import refine

    dpo = DPOSettings(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, lora=lora,
                      train_top=train_top, precision=precision, seed=dpo_seed)  # fmt: skip
    cfg = RefineConfig(policy=policy, scores=str(scores), prompts=read_prompts(prompts), scorers=list(scorer),
                       out=str(out), reference=reference, certificate=None if certificate is None else str(certificate),
                       rounds=rounds, step=step, eta=eta, secant=secant, start=start, floor=floor, level=level, k=k,
                       max_new_tokens=max_new_tokens, gen_batch_size=gen_batch_size, seed=seed,
                       test_prompts=None if test_prompts is None else read_prompts(test_prompts), test_k=test_k,
                       test_seed=test_seed, mode=mode, pairs_per_prompt=pairs_per_prompt, label_seed=label_seed,
                       dpo=dpo, chat_template=chat_template, dtype=dtype, insample=insample,
                       scorer_options=ScorerOptions(scorer_template, scorer_dtype, scorer_max_length,
                                                    scorer_batch_size))  # fmt: skip
    say = typer.echo if is_main_process() else (lambda *_: None)
    report = refine(cfg, say=say)
    if is_main_process():
        verdict = "on target" if report.stopped else f"not on target after {len(report.rounds) - 1} round(s)"
        typer.echo(f"{verdict}; the rounds table is in {out / 'rounds.md'}")
