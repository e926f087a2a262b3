"""The `can` command: one subcommand per stage (DESIGN §5).

Heavy modules (JAX, later torch) are imported inside the commands, so `can --help` is instant and `can dual`
never imports torch. User mistakes end as one `error: …` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="can",
    help="One-shot safety alignment by optimal dualization (CAN, arXiv 2405.19544).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_USER_ERROR = 1
EXIT_NOT_CONVERGED = 3

ScoresArg = Annotated[
    Path,
    typer.Argument(
        help="Scores table (.parquet, .jsonl or .csv), one row per response: a prompt id column, the reward "
        "column and one column per constraint.",
        show_default=False,
    ),
]
RewardOpt = Annotated[str, typer.Option("--reward", "-r", help="Reward column (higher = more helpful).")]
ConstraintOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--constraint",
        "-c",
        help="COL=MARGIN: a utility column (higher = safer) and the improvement over the reference policy its "
        "mean must gain. Repeat for several constraints.",
        show_default=False,
    ),
]
CostOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--cost",
        help="COL=MARGIN: a cost column (lower = safer; negated on the way in) and the reduction of its mean "
        "that is required. Repeatable.",
        show_default=False,
    ),
]
BetaOpt = Annotated[float, typer.Option("--beta", "-b", help="KL weight β > 0 (the same β the DPO run uses).")]
PromptIdOpt = Annotated[str, typer.Option("--prompt-id", help="Prompt id column.")]
Float32Opt = Annotated[bool, typer.Option("--float32", help="Solve in float32 (default float64).")]
DropOpt = Annotated[
    bool, typer.Option("--drop-bad-rows", help="Drop rows with NaN/inf/missing scores instead of failing.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON certificate to stdout.")]


def _fail(message: str, code: int = EXIT_USER_ERROR):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _setup_jax():
    """float64 on (DESIGN §2) and a persistent compile cache, before any array exists."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX may share a GPU with torch
    import jax

    jax.config.update("jax_enable_x64", True)
    cache = Path(os.environ.get("CAN_CACHE_DIR", Path.home() / ".cache" / "can")) / "jax"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    except OSError:
        pass  # a read-only home only costs the compile time


def _check_beta(beta: float):
    if not (math.isfinite(beta) and beta > 0):
        _fail(f"--beta must be a positive finite number, got {beta}")


def _load(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows):
    import jax.numpy as jnp

    from bridge.tables import load_scores, parse_constraint

    specs = [parse_constraint(c, "utility") for c in constraint or []]
    specs += [parse_constraint(c, "cost") for c in cost or []]
    return load_scores(
        scores,
        reward,
        specs,
        prompt_id=prompt_id,
        drop_bad_rows=drop_bad_rows,
        dtype=jnp.float32 if float32 else jnp.float64,
    )


def _console():
    """Rich console no narrower than the tables (a pipe or CI log otherwise truncates them to 80 columns)."""
    from rich.console import Console

    console = Console()
    return Console(width=max(console.width, 140)) if console.width < 140 else console


def _print_certificate(cert: dict, title: str):
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    table = Table(title=title)
    for col in ("constraint", "kind", "margin b", "λ*", "± s.e.", "active", "predicted gain", "reach"):
        table.add_column(col, justify="left" if col in ("constraint", "kind") else "right")

    def num(x, fmt=".6g"):
        return "—" if x is None else format(x, fmt)

    for c in cert["constraints"]:
        table.add_row(
            escape(c["name"]),
            c["kind"],
            num(c["margin"]),
            num(c["lambda"]),
            num(c["standard_error"], ".2g"),
            "yes" if c["active"] else "no",
            num(c["predicted_gain"]),
            num(c["reach"]),
        )
    console.print(table)
    p = cert["predicted"]
    d = cert["data"]
    console.print(
        f"status: {cert['status']} — {cert['message']}\n"
        f"β = {cert['beta']:g}; {cert['iterations']} Newton iterations ({cert['function_evaluations']} passes), "
        f"KKT residual {cert['kkt_residual']:.2e}; Hessian on the active set: least eigenvalue "
        f"{num(cert['min_hessian_eig'], '.3g')}, condition {num(cert['hessian_condition'], '.3g')}\n"
        f"predicted for π_λ*: reward gain {p['reward_gain']:+.4g}, KL(π‖π_ref) {p['kl']:.4g} nats, "
        f"effective sample fraction {p['ess_fraction']:.3f}\n"
        f"data: {d['n_prompts']} prompts, {d['n_responses']} responses"
        + (f", {d['dropped_rows']} bad rows dropped" if d.get("dropped_rows") else "")
    )
    for note in cert.get("diagnostics", []):
        console.print(f"[yellow]warning:[/yellow] {escape(note)}")


@app.command()
def dual(
    scores: ScoresArg,
    reward: RewardOpt,
    beta: BetaOpt,
    constraint: ConstraintOpt = None,
    cost: CostOpt = None,
    prompt_id: PromptIdOpt = "prompt_id",
    float32: Float32Opt = False,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Write the certificate JSON here (atomically).")
    ] = None,
    json_out: JsonOpt = False,
    tol: Annotated[
        Optional[float], typer.Option(help="KKT residual tolerance (default 1e-9 float64, 1e-5 float32).")
    ] = None,
    max_iter: Annotated[int, typer.Option(help="Newton iteration limit.")] = 100,
    se: Annotated[bool, typer.Option("--se/--no-se", help="Sandwich standard errors of λ*.")] = True,
    drop_bad_rows: DropOpt = False,
):
    """Solve the CAN dual once: λ* for the constraints, with its certificate (DESIGN §2).

    Example: can dual scores.parquet --reward helpful --cost harm=0.5 --constraint honest=0.1 --beta 0.1
    --out cert.json
    """
    _check_beta(beta)
    _setup_jax()
    from bridge.certificate import data_summary, solve_and_certify, write_certificate
    from can_jax.errors import CanError

    t0 = time.perf_counter()
    try:
        loaded = _load(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows)
        data = data_summary(loaded, reward, prompt_id)
        t1 = time.perf_counter()
        _, cert = solve_and_certify(loaded, beta, tol, max_iter, se, data)
    except CanError as err:
        _fail(str(err))
    cert["timing"] = {"load_s": round(t1 - t0, 4), "solve_s": round(time.perf_counter() - t1, 4)}
    if out is not None:
        write_certificate(out, cert)
    if json_out:
        import json

        typer.echo(json.dumps(cert, indent=2))
    else:
        _print_certificate(cert, f"CAN dual certificate — {scores.name}")
        if out is not None:
            typer.echo(f"certificate written to {out}")
    if not cert["converged"]:
        typer.echo(f"error: not converged: {cert['message']}", err=True)
        raise typer.Exit(EXIT_NOT_CONVERGED)


def _parse_values(text: str):
    import numpy as np

    try:
        if ":" in text:
            start, stop, num = text.split(":")
            return np.linspace(float(start), float(stop), int(num))
        return np.array([float(v) for v in text.split(",") if v.strip()])
    except ValueError:
        _fail(f"--values {text!r}: use START:STOP:NUM or a comma-separated list of numbers")


@app.command()
def sweep(
    scores: ScoresArg,
    reward: RewardOpt,
    beta: BetaOpt,
    constraint: ConstraintOpt = None,
    cost: CostOpt = None,
    vary: Annotated[Optional[str], typer.Option(help="Constraint whose margin is swept (default: the first).")] = None,
    values: Annotated[str, typer.Option(help="Margins for it: START:STOP:NUM or a comma-separated list.")] = "0:1:21",
    prompt_id: PromptIdOpt = "prompt_id",
    float32: Float32Opt = False,
    plot: Annotated[Path, typer.Option(help="Where to write the plot (PNG).")] = Path("sweep.png"),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not write a plot.")] = False,
    json_out: JsonOpt = False,
    drop_bad_rows: DropOpt = False,
):
    """λ*(b) along a grid of margins for one constraint (the others fixed), with predicted gains and a plot.

    All grid points are solved at once (vmapped). Points beyond the reachable edge are marked infeasible.
    """
    _check_beta(beta)
    _setup_jax()
    import jax.numpy as jnp
    import numpy as np

    from can_jax.errors import CanError
    from can_jax.result import Status
    from can_jax.sweep import margin_grid, sweep_jit

    grid_values = _parse_values(values)
    if grid_values.size == 0:
        _fail("--values gave no margins")
    try:
        loaded = _load(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows)
    except CanError as err:
        _fail(str(err))
    names = loaded.names
    name = vary or names[0]
    if name not in names:
        _fail(f"--vary {name!r} is not one of the constraints {names}")
    j = names.index(name)
    dtype = loaded.scores.reward.dtype
    grid = margin_grid(jnp.asarray(loaded.margins, dtype), j, jnp.asarray(grid_values, dtype))
    res = sweep_jit(loaded.scores, grid, beta)
    status = np.asarray(res.status)
    lam = np.asarray(res.x)
    gains = np.asarray(res.predicted.utility_gain)
    ok = status == Status.CONVERGED
    rows = []
    for i, b in enumerate(grid_values):
        rows.append(
            {
                "margin": float(b),
                "status": Status(int(status[i])).name.lower(),
                "lambda": {n: (float(lam[i, k]) if ok[i] else None) for k, n in enumerate(names)},
                "predicted_gain": {n: (float(gains[i, k]) if ok[i] else None) for k, n in enumerate(names)},
                "reward_gain": float(res.predicted.reward_gain[i]) if ok[i] else None,
                "kl": float(res.predicted.kl[i]) if ok[i] else None,
            }
        )
    if not no_plot:
        labels = [f"{n} (−cost)" if kd == "cost" else n for n, kd in zip(names, loaded.kinds)]
        _plot_sweep(plot, name, labels, grid_values, lam, gains, res, ok)
    if json_out:
        import json

        typer.echo(json.dumps({"vary": name, "beta": beta, "points": rows}, indent=2))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"λ*(b) sweeping the margin of {name!r} (β = {beta:g})")
    table.add_column(escape(f"b[{name}]"), justify="right")
    table.add_column("status")
    for n in names:
        table.add_column(escape(f"λ*[{n}]"), justify="right")
    table.add_column("reward gain", justify="right")
    table.add_column("KL", justify="right")
    for i, row in enumerate(rows):
        cells = [f"{row['margin']:.4g}", row["status"]]
        cells += [f"{lam[i, k]:.5g}" if ok[i] else "—" for k in range(len(names))]
        cells += [f"{row['reward_gain']:+.4g}", f"{row['kl']:.4g}"] if ok[i] else ["—", "—"]
        table.add_row(*cells)
    _console().print(table)
    if not no_plot:
        typer.echo(f"plot written to {plot}")


def _plot_sweep(path, name, names, values, lam, gains, res, ok):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bridge.files import write_figure

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for k, n in enumerate(names):
        axes[0].plot(values[ok], lam[ok, k], marker=".", label=n)
        axes[1].plot(values[ok], gains[ok, k], marker=".", label=n)
    axes[1].plot(values[ok], values[ok], "k:", lw=1, label="b (target)")
    reward_gain = np.asarray(res.predicted.reward_gain)
    kl = np.asarray(res.predicted.kl)
    axes[2].plot(values[ok], reward_gain[ok], marker=".", label="reward gain")
    axes[2].plot(values[ok], kl[ok], marker=".", label="KL(π‖π_ref)")
    if (~ok).any():
        for ax in axes:
            ax.axvspan(values[~ok].min(), values[~ok].max(), color="red", alpha=0.08, label="infeasible")
    titles = ["λ* per constraint", "predicted utility gain", "predicted reward gain and KL"]
    for ax, title in zip(axes, titles):
        ax.set_xlabel(f"margin b[{name}]")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig, dpi=110)
    plt.close(fig)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's files.")] = Path("can-demo"),
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Only the dual on a synthetic 3-constraint problem (seconds).")
    ] = False,
    prompts: Annotated[int, typer.Option(help="--synthetic: number of synthetic prompts N.")] = 20_000,
    responses: Annotated[int, typer.Option(help="--synthetic: responses per prompt K (ragged: 2..K).")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """The main job on an embedded default: the whole MoCAN chain on SmolLM2-135M-Instruct, on CPU.

    collect (32 prompts × 4 samples, lexical scorers: reward helpfulness, constraints harmlessness and
    politeness) → dual (margins at 30% of each constraint's reach) → soft labels → one DPO run → evaluation on 16
    held-out prompts, predicted vs achieved gains side by side in OUT/evaluation/evaluation.md.
    With --synthetic: a synthetic 3-constraint problem, solved, certified and swept (no language model).
    """
    if not synthetic:
        _setup_jax()
        from can_jax.errors import CanError
        from train.demo import DemoConfig, run_chain

        try:
            report = run_chain(DemoConfig(seed=seed), out, say=typer.echo)
        except CanError as err:
            _fail(str(err))
        _print_evaluation(report)
        return
    _setup_jax()
    import jax
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from can_jax.synthetic import synthetic_scores

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
    path = out / "scores.parquet"
    tmp = out / ".scores.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
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


@app.command("collect")
def collect_cmd(
    prompts: Annotated[Path, typer.Argument(help="Prompts: one per line (.txt) or {'prompt': …} per line (.jsonl).")],
    scorer: Annotated[
        list[str],
        typer.Option(
            "--scorer",
            "-s",
            help="NAME=SPEC, repeatable: builtin:NAME, module:function, or a "
            "Transformers score-model directory. Each becomes a column of the table.",
        ),
    ],  # fmt: skip
    out: Annotated[Path, typer.Option("--out", "-o", help="Scores table to write (.parquet).")] = Path(
        "scores.parquet"
    ),
    policy: Annotated[str, typer.Option(help="Reference policy π_ref: a Transformers directory or 'smollm2'.")] = (
        "smollm2"
    ),
    k: Annotated[int, typer.Option("--k", help="Responses sampled per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Token limit of each response.")] = 48,
    batch_size: Annotated[int, typer.Option(help="Sequences per generation batch.")] = 16,
    shard_size: Annotated[int, typer.Option(help="Prompts per shard (the unit of resumption).")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed (shard s uses seed + s).")] = 0,
):
    """Sample K responses per prompt from π_ref (temperature 1), record log π_ref the DPO way, score, write the table.

    Resumable: finished shards in OUT.shards/ are kept and skipped on a rerun with the same settings.
    """
    from rich.progress import Progress

    from can_jax.errors import CanError
    from train.collect import CollectConfig, collect

    cfg = CollectConfig(
        prompts=str(prompts), policy=policy, scorers=list(scorer), k=k, max_new_tokens=max_new_tokens,
        batch_size=batch_size, shard_size=shard_size, seed=seed,
    )  # fmt: skip
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("collecting", total=None)

            def step(s, n, skipped):
                bar.update(task, total=n, completed=s + 1, description="resumed" if skipped else "collecting")

            path = collect(cfg, out, progress=step)
    except CanError as err:
        _fail(str(err))
    typer.echo(f"scores written to {path}")


@app.command()
def label(
    scores: ScoresArg,
    certificate: Annotated[Path, typer.Argument(help="Certificate JSON written by `can dual --out`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Preference dataset to write (.parquet).")] = Path(
        "preferences.parquet"
    ),
    mode: Annotated[str, typer.Option(help="bt (sampled Bradley–Terry labels), soft (keep σ(Δs)) or hard.")] = "bt",
    pairs_per_prompt: Annotated[int, typer.Option(help="Random response pairs per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for pair choice and bt labels.")] = 0,
    prompt_col: Annotated[str, typer.Option("--prompt-col", help="Prompt text column.")] = "prompt",
    response_col: Annotated[str, typer.Option("--response-col", help="Response text column.")] = "response",
    check_hash: Annotated[
        bool, typer.Option("--check-hash/--no-check-hash", help="Refuse a certificate made for another table.")
    ] = True,
):
    """Pseudo-preference pairs from a scores table and its certificate (labels from r + λ*ᵀg), ready for DPO.

    The output holds prompt, chosen, rejected, score_chosen, score_rejected and p_chosen, with β and λ* stored
    as metadata. Prompts with fewer than two responses are skipped and counted.
    """
    from bridge.certificate import read_certificate
    from bridge.labels import pseudo_preferences, write_preferences
    from can_jax.errors import CanError

    try:
        cert = read_certificate(certificate)
        table, stats = pseudo_preferences(scores, cert, mode, pairs_per_prompt, seed, prompt_col, response_col,
                                          check_hash)  # fmt: skip
    except CanError as err:
        _fail(str(err))
    write_preferences(out, table)
    typer.echo(
        f"{stats.pairs} {mode} pairs from {stats.prompts_used} prompts written to {out} (β = {cert['beta']:g}); "
        f"{stats.prompts_skipped} prompts with < 2 responses skipped"
        + (f", {stats.ties_dropped} tied pairs dropped" if stats.ties_dropped else "")
    )


@app.command("train")
def train_cmd(
    preferences: Annotated[Path, typer.Argument(help="Preference dataset written by `can label`.")],
    policy: Annotated[str, typer.Option(help="Policy to align: a Transformers directory, or 'smollm2'.")] = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints/, policy/).")] = Path("can-run"),
    epochs: Annotated[float, typer.Option(help="Epochs over the pairs.")] = 1.0,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-6,
    batch_size: Annotated[int, typer.Option(help="Pairs per device step.")] = 8,
    max_length: Annotated[int, typer.Option(help="Token limit of prompt + response (TRL truncation).")] = 512,
    lora: Annotated[bool, typer.Option("--lora", help="Train a LoRA adapter (peft) instead of all weights.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in OUT.")] = False,
    beta: Annotated[
        Optional[float], typer.Option(help="Override β (must equal the certificate's unless --allow-beta-mismatch).")
    ] = None,
    allow_beta_mismatch: Annotated[bool, typer.Option("--allow-beta-mismatch")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """One DPO run on the pseudo-preferences with TRL, β taken from the certificate (CUDA + bf16 when present).

    Soft labels use the per-pair target p_chosen; bt/hard labels use TRL's sigmoid loss. Several GPUs:
    `accelerate launch -m train.cli train PREFS ...`.
    """
    from can_jax.errors import CanError

    try:
        from train.dpo import load_preferences, train

        if beta is not None and allow_beta_mismatch:
            _, meta = load_preferences(preferences)
            typer.echo(f"warning: β = {beta} instead of the certificate's {meta['beta']}", err=True)
        final = train(preferences, policy, out, beta=None if allow_beta_mismatch else beta, epochs=epochs, lr=lr,
                      batch_size=batch_size, max_length=max_length, lora=lora, resume=resume, seed=seed,
                      **({"beta_override": beta} if allow_beta_mismatch and beta is not None else {}))  # fmt: skip
    except (CanError, FileNotFoundError) as err:
        _fail(str(err))
    typer.echo(f"aligned policy written to {final}")


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
):
    """Achieved vs predicted: sample both policies on held-out prompts, score, compare gains with the certificate."""
    from bridge.certificate import read_certificate
    from can_jax.errors import CanError
    from train.collect import read_prompts
    from train.evaluate import evaluate

    try:
        cert = read_certificate(certificate)
        report = evaluate(aligned, reference, read_prompts(prompts), list(scorer), cert, out, k=k,
                          max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    except CanError as err:
        _fail(str(err))
    _print_evaluation(report)
    typer.echo(f"report written to {out / 'evaluation.md'}")


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Folder for report.md, report.json and the plots.")] = Path("can-bench"),
    quick: Annotated[
        bool, typer.Option("--quick", help="Smaller worlds and budgets (a few minutes on 2 cores).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """One-shot CAN vs iterative primal-dual (GDA, C-DPO) in synthetic worlds with exact answers.

    Measures the dual estimate's error and interval coverage, the policy-gradient steps each method needs to reach
    the constrained optimum for m = 1..16 constraints, and the bias of bt/soft/hard labels; writes OUT/report.md.
    """
    _setup_jax()
    from rich.progress import Progress

    from train.bench import BenchConfig, run

    cfg = BenchConfig.quick() if quick else BenchConfig()
    cfg.seed = seed
    with Progress(transient=True) as bar:
        task = bar.add_task("benchmark", total=len(cfg.ms) + 3)
        path = run(cfg, out, progress=lambda _: bar.advance(task))
    typer.echo(f"report written to {path}")


def _print_evaluation(report: dict):
    from rich.table import Table

    table = Table(title=f"achieved vs predicted gains on {report['prompts']} held-out prompts (β = {report['beta']:g})")
    for col in ("score", "role", "margin", "predicted", "achieved", "95% interval"):
        table.add_column(col, justify="left" if col in ("score", "role") else "right")
    for r in report["rows"]:
        table.add_row(r["name"], r["role"], "—" if r["margin"] is None else f"{r['margin']:+.3f}",
                      "—" if r["predicted_gain"] is None else f"{r['predicted_gain']:+.3f}",
                      f"{r['achieved_gain']:+.3f}", f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]")  # fmt: skip
    _console().print(table)


def main():
    app()


if __name__ == "__main__":
    sys.exit(main())
