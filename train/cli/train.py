"""`can train` ④ (one DPO run on the pseudo-preferences) and `can prealign` (PeCAN's pre-alignments)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, fail, is_main_process
from train.cli.launch import launch_if_asked
from train.cli.options import FROM_CONFIG, defaults_from
from train.settings import DPOSettings, TrainConfig

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
# The DPO options both commands take (`train.dpo_config.DPOSettings` holds their defaults and help); unset ones come
# from --config, `--name value` or the defaults.
EpochsOpt = Annotated[Optional[float], typer.Option()]
LrOpt = Annotated[Optional[float], typer.Option()]
BatchOpt = Annotated[Optional[int], typer.Option()]
MaxLengthOpt = Annotated[Optional[int], typer.Option()]
LoraOpt = Annotated[bool, typer.Option("--lora")]
TrainTopOpt = Annotated[Optional[int], typer.Option()]
PrecisionOpt = Annotated[str, typer.Option()]
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
@defaults_from(TrainConfig, DPOSettings, rename={"config": "config_file"})
def train_cmd(
    ctx: typer.Context,
    preferences: Annotated[Path, typer.Argument(help="Preference dataset written by `can label`.")],
    policy: Annotated[str, typer.Option()] = FROM_CONFIG,
    out: Annotated[Path, typer.Option("--out", "-o")] = FROM_CONFIG,
    epochs: EpochsOpt = FROM_CONFIG,
    lr: LrOpt = FROM_CONFIG,
    batch_size: BatchOpt = FROM_CONFIG,
    max_length: MaxLengthOpt = FROM_CONFIG,
    config: ConfigOpt = FROM_CONFIG,
    chat_template: TemplateOpt = FROM_CONFIG,
    lora: LoraOpt = FROM_CONFIG,
    train_top: TrainTopOpt = FROM_CONFIG,
    precision: PrecisionOpt = FROM_CONFIG,
    resume: Annotated[bool, typer.Option("--resume")] = FROM_CONFIG,
    overwrite: OverwriteOpt = FROM_CONFIG,
    beta: Annotated[Optional[float], typer.Option()] = FROM_CONFIG,
    allow_beta_mismatch: Annotated[bool, typer.Option("--allow-beta-mismatch")] = False,
    seed: Annotated[Optional[int], typer.Option()] = FROM_CONFIG,
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
    from train.dpo import load_preferences, run

    dpo = _settings(locals())
    if beta is not None and allow_beta_mismatch:
        _, prefs = load_preferences(preferences, beta)
        typer.echo(f"warning: β = {beta} instead of the certificate's {prefs.beta}", err=True)
    final = _run_dpo(run, ctx, locals(), dpo, beta=None if allow_beta_mismatch else beta,
                     beta_override=beta if allow_beta_mismatch else None)  # fmt: skip
    if is_main_process():
        typer.echo(f"aligned policy written to {final}")


def _settings(opts: dict) -> DPOSettings:
    """The DPO settings of a DPO command's options (checked as they are built)."""
    return DPOSettings(**{f: opts[f] for f in ("epochs", "lr", "batch_size", "max_length", "lora", "train_top",
                                               "precision", "seed")})  # fmt: skip


def _run_dpo(run, ctx: typer.Context, opts: dict, dpo: DPOSettings, **betas):
    """`run(TrainConfig)` from a DPO command's options (`train` and `prealign` share all but β)."""
    config = opts["config"]
    try:
        return run(TrainConfig(
            preferences=str(opts["preferences"]), policy=opts["policy"], out=str(opts["out"]), dpo=dpo,
            chat_template=opts["chat_template"], resume=opts["resume"], extra_args=list(ctx.args),
            config_file=None if config is None else str(config), overwrite=opts["overwrite"], **betas,
        ))  # fmt: skip
    except FileNotFoundError as err:  # a file a config or model names (the command's own inputs are checked)
        fail(str(err))


@app.command(context_settings=EXTRA)
@defaults_from(TrainConfig, DPOSettings, rename={"config": "config_file"})
def prealign(
    ctx: typer.Context,
    preferences: Annotated[
        Path, typer.Argument(help="Preference pairs: prompt, chosen, rejected (.parquet, .jsonl or .csv).")
    ],
    beta: Annotated[float, typer.Option("--beta", "-b", help="DPO KL weight β of this pre-alignment (recorded).")],
    policy: Annotated[str, typer.Option(help="Reference policy π_ref: a directory, or 'smollm2'.")] = FROM_CONFIG,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints/, policy/).")] = Path("prealigned"),
    epochs: EpochsOpt = FROM_CONFIG,
    lr: LrOpt = FROM_CONFIG,
    batch_size: BatchOpt = FROM_CONFIG,
    max_length: MaxLengthOpt = FROM_CONFIG,
    config: ConfigOpt = FROM_CONFIG,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (merged on save).")] = FROM_CONFIG,
    train_top: TrainTopOpt = FROM_CONFIG,
    precision: PrecisionOpt = FROM_CONFIG,
    chat_template: TemplateOpt = FROM_CONFIG,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.")] = FROM_CONFIG,
    overwrite: OverwriteOpt = FROM_CONFIG,
    seed: Annotated[Optional[int], typer.Option()] = FROM_CONFIG,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """PeCAN: DPO of π_ref on one preference dataset (helpfulness only, or one safety aspect), recording β.

    Run once per dataset; then `can collect --aligned NAME=OUT/policy ...` and `can dual --pecan`. Other DPOConfig
    options: --config FILE and/or `--name value` after the options, as for `can train` (β is this command's).
    """
    launch_if_asked(num_processes, accelerate_config)
    from train.dpo import prealign as run

    final = _run_dpo(run, ctx, locals(), _settings(locals()), beta_override=beta)
    if is_main_process():
        typer.echo(f"pre-aligned policy (β = {beta:g}) written to {final}")
