"""`can train` ④ (one DPO run on the pseudo-preferences) and `can prealign` (PeCAN's pre-alignments)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, fail, is_main_process
from train.cli.launch import launch_if_asked

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
TemplateOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Text pairs: raw instructions become one-turn conversations that TRL renders with the policy's chat "
        "template, as `can collect` does [default: when the policy has one]. Pairs with sampled ids (from "
        "`can label` on a collected table) are trained on those ids.",
    ),
]
# The DPO options both commands take; unset ones come from --config, `--name value` or the defaults.
EpochsOpt = Annotated[Optional[float], typer.Option(help="Epochs over the pairs [default: 1].")]
LrOpt = Annotated[
    Optional[float],
    typer.Option(help="Learning rate [default: 5e-6; 5e-5 with --lora, whose adapter needs a larger step]."),
]
BatchOpt = Annotated[Optional[int], typer.Option(help="Pairs per device step [default: 8].")]
MaxLengthOpt = Annotated[
    Optional[int], typer.Option(help="Token limit of prompt + response (TRL truncation) [default: 512].")
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the policy of a finished run in OUT (or an unfinished run's checkpoints)."
    ),
]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", help="YAML/JSON file of DPOConfig options (TRL's parser conventions).")
]


@app.command("train", context_settings=EXTRA)
def train_cmd(
    ctx: typer.Context,
    preferences: Annotated[Path, typer.Argument(help="Preference dataset written by `can label`.")],
    policy: Annotated[str, typer.Option(help="Policy to align: a Transformers directory, or 'smollm2'.")] = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints/, policy/).")] = Path("can-run"),
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_length: MaxLengthOpt = None,
    config: ConfigOpt = None,
    chat_template: TemplateOpt = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (peft) instead of all weights.")] = False,
    train_top: Annotated[
        Optional[int], typer.Option(help="Train only the top N transformer blocks (faster on CPU; not with --lora).")
    ] = None,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast where the GPU or CPU has native bf16), bf16 or fp32.")
    ] = "auto",
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue from the last checkpoint in OUT (same preferences, policy, settings)."),
    ] = False,
    overwrite: OverwriteOpt = False,
    beta: Annotated[
        Optional[float], typer.Option(help="Override β (must equal the certificate's unless --allow-beta-mismatch).")
    ] = None,
    allow_beta_mismatch: Annotated[bool, typer.Option("--allow-beta-mismatch")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed [default: 0, or the DPO config's].")] = None,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """One DPO run on the pseudo-preferences with TRL, β taken from the certificate (CUDA + bf16 when present).

    Soft labels use the per-pair target p_chosen; bt/hard labels use TRL's sigmoid loss. Several GPUs:
    `--num-processes N` (DDP; DeepSpeed/FSDP through `--accelerate-config FILE`).

    Any other DPOConfig option (TRL's names): in a YAML/JSON file given with --config, and/or after the other
    options as `--name value` (e.g. `--gradient_accumulation_steps 4 --lr_scheduler_type cosine --warmup_steps 10
    --report_to wandb`); the options above win over both. Options that would change what CAN optimises (loss_type
    other than sigmoid, label_smoothing, ld_alpha, f_divergence_type, use_weighting, sync_ref_model, a β other than
    the certificate's) are refused with the reason.
    """
    launch_if_asked(num_processes, accelerate_config)
    from can_jax.errors import CanError

    try:
        from train.dpo import TrainConfig, load_preferences, run

        if beta is not None and allow_beta_mismatch:
            _, prefs = load_preferences(preferences, beta)
            typer.echo(f"warning: β = {beta} instead of the certificate's {prefs.beta}", err=True)
        final = run(TrainConfig(
            preferences=str(preferences), policy=policy, out=str(out), beta=None if allow_beta_mismatch else beta,
            epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, lora=lora, train_top=train_top,
            precision=precision, resume=resume, seed=seed, config_file=None if config is None else str(config),
            extra_args=list(ctx.args), chat_template=chat_template, overwrite=overwrite,
            beta_override=beta if allow_beta_mismatch else None,
        ))  # fmt: skip
    except (CanError, FileNotFoundError) as err:
        fail(str(err))
    if is_main_process():
        typer.echo(f"aligned policy written to {final}")


@app.command(context_settings=EXTRA)
def prealign(
    ctx: typer.Context,
    preferences: Annotated[
        Path, typer.Argument(help="Preference pairs: prompt, chosen, rejected (.parquet, .jsonl or .csv).")
    ],
    beta: Annotated[float, typer.Option("--beta", "-b", help="DPO KL weight β of this pre-alignment (recorded).")],
    policy: Annotated[str, typer.Option(help="Reference policy π_ref: a directory, or 'smollm2'.")] = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints/, policy/).")] = Path("prealigned"),
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_length: MaxLengthOpt = None,
    config: ConfigOpt = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (merged on save).")] = False,
    train_top: Annotated[Optional[int], typer.Option(help="Train only the top N transformer blocks.")] = None,
    chat_template: TemplateOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.")] = False,
    overwrite: OverwriteOpt = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """PeCAN: DPO of π_ref on one preference dataset (helpfulness only, or one safety aspect), recording β.

    Run once per dataset; then `can collect --aligned NAME=OUT/policy ...` and `can dual --pecan`. Other DPOConfig
    options: --config FILE and/or `--name value` after the options, as for `can train` (β is this command's).
    """
    launch_if_asked(num_processes, accelerate_config)
    from can_jax.errors import CanError

    try:
        from train.dpo import TrainConfig
        from train.dpo import prealign as run

        final = run(TrainConfig(
            preferences=str(preferences), policy=policy, out=str(out), beta_override=beta, epochs=epochs, lr=lr,
            batch_size=batch_size, max_length=max_length, lora=lora, train_top=train_top, chat_template=chat_template,
            resume=resume, seed=seed, config_file=None if config is None else str(config), extra_args=list(ctx.args),
            overwrite=overwrite,
        ))  # fmt: skip
    except (CanError, FileNotFoundError) as err:
        fail(str(err))
    if is_main_process():
        typer.echo(f"pre-aligned policy (β = {beta:g}) written to {final}")
