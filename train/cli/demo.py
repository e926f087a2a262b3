"""`can demo`: the whole chain on the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from train.chain import RefineConfig
from train.cli.app import AccelerateConfigOpt, ProcessesOpt, app, fail, is_main_process, setup_jax
from train.cli.launch import launch_if_asked
from train.cli.options import FROM_CONFIG, EtaOpt, SecantOpt, StartOpt, StepOpt, defaults_from
from train.demo import DemoConfig


@app.command()
@defaults_from(DemoConfig, RefineConfig, rename={"out": None})
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's files.")] = Path("can-demo"),
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Only the dual on a synthetic 3-constraint problem (seconds).")
    ] = False,
    prompts: Annotated[int, typer.Option(help="--synthetic: number of synthetic prompts N.")] = 20_000,
    responses: Annotated[int, typer.Option(help="--synthetic: responses per prompt K (ragged: 2..K).")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = FROM_CONFIG,
    pecan: Annotated[
        bool,
        typer.Option(
            "--pecan",
            help="Also the preference-only PeCAN chain (pre-aligned models, no scores) on the same samples, and a "
            "MoCAN-vs-PeCAN report in OUT/pecan/comparison.md. Reuses a finished MoCAN run in OUT.",
        ),
    ] = False,
    refine: Annotated[
        int,
        typer.Option(
            "--refine",
            help="Then up to N correction rounds (`can refine`) on the finished run: calibration on 96 prompts (the 48 "
            "selection prompts and 48 more), every round also measured on the 48 test prompts; the rounds table in "
            "OUT/refine/rounds.md.",
        ),
    ] = 0,
    step: StepOpt = FROM_CONFIG,
    eta: EtaOpt = FROM_CONFIG,
    secant: SecantOpt = FROM_CONFIG,
    start: StartOpt = FROM_CONFIG,
    num_processes: ProcessesOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
):
    """The main job on an embedded default: the whole MoCAN chain on SmolLM2-135M-Instruct, on CPU.

    collect (128 templated training prompts × 8 samples, lexical scorers: reward helpfulness, constraints
    harmlessness and politeness) → dual (β = 0.5, margins at 50% of each constraint's reach) → ~1,500 hard labels
    (12 per prompt) → one DPO epoch (top 8 blocks) → evaluation: predicted gains beside the aligned model's gains on the
    training samples and on 48 test prompts never used to choose these settings, with a text check (distinct-2,
    log π_ref per token) and the KL, in OUT/evaluation/evaluation.md (10–13 min on a 2-core Intel Xeon).
    With --refine N: then up to N correction rounds (see `can refine`), with the rounds table in OUT/refine/rounds.md.
    With --synthetic: a synthetic 3-constraint problem, solved, certified and swept (no language model).
    """
    if (synthetic or pecan) and ((num_processes or 1) > 1 or accelerate_config is not None):
        fail(f"{'--synthetic' if synthetic else '--pecan'} runs in one process: leave out --num-processes and "
             "--accelerate-config")  # fmt: skip
    launch_if_asked(num_processes, accelerate_config)
    if not synthetic:
        setup_jax()
        from train.cli.evaluate import print_evaluation
        from train.demo import run_chain

        cfg = DemoConfig(seed=seed)
        if refine:  # the rounds' options, checked by the rounds' own config before the ~14-minute chain
            from train.demo_prompts import CALIBRATION_PROMPTS

            RefineConfig(policy="", scores="", prompts=list(CALIBRATION_PROMPTS), scorers=[], step=step, eta=eta,
                         start=start, mode=cfg.mode, pairs_per_prompt=cfg.pairs_per_prompt,
                         dpo=cfg.dpo_settings()).check()  # fmt: skip
        say = typer.echo if is_main_process() else (lambda *_: None)
        memo = {}  # the reference's samples on the test prompts, drawn once for the chain and the rounds
        if (pecan or refine) and (out / "evaluation" / "evaluation.json").exists():
            say(f"reusing the finished MoCAN run in {out}")
        else:
            report = run_chain(cfg, out, say=say, reference_memo=memo)
            if is_main_process():
                print_evaluation(report)
        if refine:
            from train.demo import run_refine

            rounds = run_refine(cfg, out, refine, say=say, reference_memo=memo, step=step, eta=eta, start=start,
                                secant=secant)
            if is_main_process():
                typer.echo(Path(rounds.out).joinpath("rounds.md").read_text())
        if pecan:
            from train.demo_pecan import run_pecan

            run_pecan(cfg, out / "pecan", out, say=typer.echo)
            typer.echo((out / "pecan" / "comparison.md").read_text())
        return
    setup_jax()
    import jax
    import numpy as np
    import pyarrow as pa

    from bridge.files import write_parquet
    from can_jax.sim.synthetic import synthetic_scores

    out.mkdir(parents=True, exist_ok=True)
    sc = synthetic_scores(jax.random.key(seed), prompts, responses, 3, rho=-0.6, ragged=True)
    mask = np.asarray(sc.mask)
    pid, slot = np.nonzero(mask)
    util = np.asarray(sc.utility)[pid, slot]
    table = pa.table(
        {
            "prompt_id": pid,
            "response": slot,
            "helpfulness": np.asarray(sc.reward)[pid, slot],
            "harmlessness": util[:, 0],
            "honesty": util[:, 1],
            "toxicity": -util[:, 2],  # given as a cost: lower is safer
        }
    )
    path = write_parquet(out / "scores.parquet", table)
    typer.echo(
        f"demo: {prompts} synthetic prompts × 2..{responses} responses, reward 'helpfulness' trading off "
        f"against 'harmlessness', 'honesty' and the cost 'toxicity'; scores in {path}"
    )
    cert_path = out / "certificate.json"
    args = [
        str(path),
        "--reward", "helpfulness",
        "--constraint", "harmlessness=0.3",
        "--constraint", "honesty=0.1",
        "--cost", "toxicity=-0.2",
        "--beta", "1.0",
    ]  # fmt: skip
    # The same code path a user's `can dual` takes, then a sweep of the first margin.
    try:
        app(["dual", *args, "--out", str(cert_path)], standalone_mode=False)
        app(
            ["sweep", *args, "--vary", "harmlessness", "--values", "-0.2:1.6:19", "--plot",
             str(out / "sweep.png")],
            standalone_mode=False,
        )  # fmt: skip
    except typer.Exit as e:
        if e.exit_code:
            raise
    typer.echo(
        "harmlessness and honesty must rise by 0.3 and 0.1 over the reference policy; toxicity may rise by up "
        f"to 0.2. λ* prices each constraint; see {cert_path} and {out / 'sweep.png'}."
    )
