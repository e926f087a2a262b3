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


def _load(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, pecan_kl=None):
    import jax.numpy as jnp

    from bridge.tables import load_scores, parse_constraint

    specs = [parse_constraint(c, "utility") for c in constraint or []]
    specs += [parse_constraint(c, "cost") for c in cost or []]
    ref_columns = None
    if pecan_kl is not None:
        from bridge.pecan import reference_columns

        ref_columns = reference_columns(scores, reward, [c.column for c in specs], pecan_kl)
    return load_scores(
        scores,
        reward,
        specs,
        prompt_id=prompt_id,
        drop_bad_rows=drop_bad_rows,
        dtype=jnp.float32 if float32 else jnp.float64,
        ref_columns=ref_columns,
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
    if "pecan" in cert:
        console.print(f"PeCAN: E_ref[g̃ | x] from the {cert['pecan']['reference']} KL estimate")
        for name, row in cert["pecan"]["kl"].items():
            console.print(
                f"  KL(π_ref ‖ π_{escape(name)}) per prompt: token-level {row['token']:.4g} (± {row['token_se']:.2g}), "
                f"sample mean {row['sample']:.4g} (± {row['sample_se']:.2g}), correlation {row['correlation']:.2f}"
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
    pecan: Annotated[
        bool,
        typer.Option(
            "--pecan",
            help="PeCAN (DESIGN §3): a table from `can collect --aligned`; the reward and constraints name "
            "pre-aligned models, margins are in their β·log-ratio units.",
        ),
    ] = False,
    kl: Annotated[
        str,
        typer.Option(
            help="--pecan: E_ref[g̃ | x] from the token-level KL (token) or the sample mean of the log-ratios (sample)."
        ),
    ] = "token",
):
    """Solve the CAN dual once: λ* for the constraints, with its certificate (DESIGN §2).

    Example: can dual scores.parquet --reward helpful --cost harm=0.5 --constraint honest=0.1 --beta 0.1
    --out cert.json
    PeCAN: can dual pecan.parquet --pecan --reward helpful --constraint harmless=0.05 --beta 0.1
    """
    _check_beta(beta)
    _setup_jax()
    from bridge.certificate import data_summary, solve_and_certify, write_certificate
    from can_jax.errors import CanError

    t0 = time.perf_counter()
    try:
        loaded = _load(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, kl if pecan else None)
        data = data_summary(loaded, reward, prompt_id)
        t1 = time.perf_counter()
        _, cert = solve_and_certify(loaded, beta, tol, max_iter, se, data)
        if pecan:
            from bridge.pecan import certificate_block

            cert["pecan"] = certificate_block(scores, reward, loaded.names, kl, prompt_id)
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
    pecan: Annotated[
        bool,
        typer.Option(
            "--pecan",
            help="Also the preference-only PeCAN chain (pre-aligned models, no scores) on the same samples, and a "
            "MoCAN-vs-PeCAN report in OUT/pecan/comparison.md. Reuses a finished MoCAN run in OUT.",
        ),
    ] = False,
):
    """The main job on an embedded default: the whole MoCAN chain on SmolLM2-135M-Instruct, on CPU.

    collect (32 prompts × 8 samples, lexical scorers: reward helpfulness, constraints harmlessness and
    politeness) → dual (β = 0.5, margins at 50% of each constraint's reach) → 256 soft labels → one DPO run (top 8
    blocks) → evaluation: predicted gains beside the aligned model's gains on the training samples and on 16
    held-out prompts, in OUT/evaluation/evaluation.md (~16 min on 2 CPU cores).
    With --synthetic: a synthetic 3-constraint problem, solved, certified and swept (no language model).
    """
    if not synthetic:
        _setup_jax()
        from can_jax.errors import CanError
        from train.cli_lm import _print_evaluation
        from train.demo import DemoConfig, run_chain

        cfg = DemoConfig(seed=seed)
        try:
            if pecan and (out / "evaluation" / "evaluation.json").exists():
                typer.echo(f"reusing the finished MoCAN run in {out}")
            else:
                _print_evaluation(run_chain(cfg, out, say=typer.echo))
            if pecan:
                from train.demo_pecan import run_pecan

                run_pecan(cfg, out / "pecan", out, say=typer.echo)
                typer.echo((out / "pecan" / "comparison.md").read_text())
        except CanError as err:
            _fail(str(err))
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


def main():
    app()


from train import cli_lm  # noqa: E402,F401  (registers collect, label, train, evaluate, prealign on `app`)

if __name__ == "__main__":
    sys.exit(main())
