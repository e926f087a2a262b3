"""`can refine` ⑥: correction rounds until the achieved gains reach the margins (issue 21)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, fail, is_main_process, setup_jax
from train.cli.collect import DtypeOpt
from train.cli.launch import launch_if_asked
from train.cli.options import (
    ChatTemplateOpt,
    EtaOpt,
    ScorerBatchOpt,
    ScorerDtypeOpt,
    ScorerMaxLengthOpt,
    ScorerTemplateOpt,
    SecantOpt,
    StartOpt,
    StepOpt,
)
from train.cli.train import BatchOpt, EpochsOpt, LrOpt, MaxLengthOpt


@app.command("refine")
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
    reference: Annotated[str, typer.Option(help="Reference policy π_ref: a directory or 'smollm2'.")] = "smollm2",
    certificate: Annotated[
        Optional[Path], typer.Option(help="Round 0's certificate [default: the one the policy folder carries].")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the rounds (round-N/, rounds.md).")] = Path(
        "can-refine"
    ),
    rounds: Annotated[int, typer.Option(help="Correction rounds at most (a rerun with more continues).")] = 2,
    step: StepOpt = "newton",
    eta: EtaOpt = 1.0,
    secant: SecantOpt = True,
    start: StartOpt = None,
    test_prompts: Annotated[
        Optional[Path],
        typer.Option(help="Held-out prompts measured every round for the table (never used to steer or stop)."),
    ] = None,
    k: Annotated[int, typer.Option("--k", help="Samples per calibration (and test) prompt and policy.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of each response.")] = 48,
    seed: Annotated[int, typer.Option(help="Sampling seed of the calibration measurements.")] = 1,
    floor: Annotated[float, typer.Option(help="The stopping rule's smallest tolerance around a margin.")] = 0.02,
    level: Annotated[
        float, typer.Option(help="Joint confidence level of the m intervals the rule judges with.")
    ] = 0.95,
    mode: Annotated[str, typer.Option(help="Label mode of the relabelled samples, as `can label`.")] = "bt",
    pairs_per_prompt: Annotated[int, typer.Option(help="Pairs per prompt, as `can label`.")] = 1,
    label_seed: Annotated[int, typer.Option(help="Seed for pair choice and bt labels.")] = 0,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_length: MaxLengthOpt = None,
    train_top: Annotated[Optional[int], typer.Option(help="Train only the top N transformer blocks.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (peft) instead of all weights.")] = False,
    precision: Annotated[str, typer.Option(help="DPO precision: auto, bf16 or fp32.")] = "auto",
    dpo_seed: Annotated[Optional[int], typer.Option(help="DPO seed [default: 0].")] = None,
    chat_template: ChatTemplateOpt = True,
    scorer_template: ScorerTemplateOpt = "auto",
    scorer_dtype: ScorerDtypeOpt = "fp32",
    scorer_max_length: ScorerMaxLengthOpt = None,
    scorer_batch_size: ScorerBatchOpt = 16,
    dtype: DtypeOpt = "fp32",
    insample: Annotated[
        bool,
        typer.Option(
            "--insample/--no-insample",
            help="Also each round's gains on the training samples (reweighted by π/π_ref: a log-prob pass).",
        ),
    ] = True,
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
    from can_jax.errors import CanError
    from train.chain import RefineConfig
    from train.prompts import check_sampling, read_prompts
    from train.refine import refine
    from train.scorers import scorer_options

    dpo = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length, "train_top": train_top,
           "lora": lora, "precision": precision, "seed": dpo_seed}  # fmt: skip
    try:
        check_sampling(k, max_new_tokens, 64, "--k")
        cfg = RefineConfig(policy=policy, scores=str(scores), prompts=read_prompts(prompts), scorers=list(scorer),
                           out=str(out), reference=reference, certificate=None if certificate is None else
                           str(certificate), rounds=rounds, step=step, eta=eta, secant=secant, start=start,
                           floor=floor,
                           level=level, k=k, max_new_tokens=max_new_tokens, seed=seed,
                           test_prompts=None if test_prompts is None else read_prompts(test_prompts), test_k=k,
                           mode=mode, pairs_per_prompt=pairs_per_prompt, label_seed=label_seed,
                           dpo={key: v for key, v in dpo.items() if v is not None and v is not False},
                           chat_template=chat_template, dtype=dtype, insample=insample,
                           scorer_options=scorer_options(scorer_template, scorer_dtype, scorer_max_length,
                                                         scorer_batch_size))  # fmt: skip
        say = typer.echo if is_main_process() else (lambda *_: None)
        report = refine(cfg, say=say)
    except CanError as err:
        fail(str(err))
    if is_main_process():
        verdict = "on target" if report.stopped else f"not on target after {len(report.rounds) - 1} round(s)"
        typer.echo(f"{verdict}; the rounds table is in {out / 'rounds.md'}")
