"""`can dual` and `can sweep` ② (DESIGN §2): the dual solve and its certificate, and λ* over a grid of margins."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from bridge.dual import DualConfig
from can_jax.errors import Outcome
from train.cli.app import (
    AtLeastOpt,
    BetaOpt,
    ConstraintOpt,
    CostAtMostOpt,
    CostOpt,
    DropOpt,
    ExitCode,
    Float32Opt,
    JsonOpt,
    PromptIdOpt,
    RewardOpt,
    ScoresArg,
    app,
    check_beta,
    console,
    echo_json,
    fail,
    load_limited,
    one_line,
    print_certificate,
    setup_jax,
)
from train.cli.options import FROM_CONFIG, defaults_from


@app.command()
@defaults_from(DualConfig, rename={"out": None, "cache": None})
def dual(
    scores: ScoresArg,
    reward: RewardOpt,
    beta: BetaOpt,
    constraint: ConstraintOpt = FROM_CONFIG,
    cost: CostOpt = FROM_CONFIG,
    prompt_id: PromptIdOpt = FROM_CONFIG,
    float32: Float32Opt = FROM_CONFIG,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Write the certificate JSON here (atomically).")
    ] = None,
    json_out: JsonOpt = False,
    tol: Annotated[
        Optional[float], typer.Option(help="KKT residual tolerance (default 1e-9 float64, 1e-5 float32).")
    ] = FROM_CONFIG,
    max_iter: Annotated[int, typer.Option(help="Newton iteration limit.")] = FROM_CONFIG,
    se: Annotated[bool, typer.Option("--se/--no-se", help="Sandwich standard errors of λ*.")] = FROM_CONFIG,
    bias: Annotated[
        bool,
        typer.Option(
            "--bias/--no-bias",
            help="Finite-K bias of λ* and of the predicted gains and KL (within-prompt jackknife, DESIGN §7): "
            "corrected estimates, standard errors and 95% intervals in the certificate's bias block.",
        ),
    ] = FROM_CONFIG,
    drop_bad_rows: DropOpt = FROM_CONFIG,
    pecan: Annotated[
        bool,
        typer.Option(
            "--pecan",
            help="PeCAN (DESIGN §3): a table from `can collect --aligned`; the reward and constraints name "
            "pre-aligned models, margins are in their β·log-ratio units.",
        ),
    ] = FROM_CONFIG,
    kl: Annotated[
        str,
        typer.Option(
            help="--pecan: E_ref[g̃ | x] from the token-level KL (token) or the sample mean of the log-ratios (sample)."
        ),
    ] = FROM_CONFIG,
    devices: Annotated[
        Optional[int],
        typer.Option(help="Local JAX devices to shard the prompts over [default: all]; recorded in the certificate."),
    ] = FROM_CONFIG,
    cache: Annotated[
        bool,
        typer.Option("--cache/--no-cache", help="JAX's persistent compilation cache (~/.cache/can/jax, or "
                     "$CAN_CACHE_DIR), and the traced programs beside it: a second run on a table of the same shape "
                     "traces and compiles nothing. CAN_NO_CACHE=1 turns it off for every command, CAN_EXPORT_CACHE=0 "
                     "the traced programs alone."),
    ] = True,
    cost_at_most: CostAtMostOpt = FROM_CONFIG,
    at_least: AtLeastOpt = FROM_CONFIG,
):
    """Solve the CAN dual once: λ* for the constraints, with its certificate (DESIGN §2).

    Example: can dual scores.parquet --reward helpful --cost harm=0.5 --constraint honest=0.1 --beta 0.1
    --out cert.json
    PeCAN: can dual pecan.parquet --pecan --reward helpful --constraint harmless=0.05 --beta 0.1
    Safe-RLHF-style limit: can dual scores.parquet --reward reward --cost-at-most cost=0 --beta 0.1
    """
    from bridge.dual import run
    from can_jax.errors import CanError

    cfg = DualConfig(scores=str(scores), reward=reward, beta=beta, constraint=list(constraint or []),
                     cost=list(cost or []), cost_at_most=list(cost_at_most or []), at_least=list(at_least or []),
                     prompt_id=prompt_id, float32=float32, tol=tol, max_iter=max_iter, se=se, bias=bias,
                     drop_bad_rows=drop_bad_rows, pecan=pecan, kl=kl, devices=devices)  # fmt: skip
    cfg.check()
    setup_jax(cache)
    cert = run(cfg)
    # A certificate is replaced only by a converged one; a failed solve goes beside it (cert.failed.json).
    written, write_error = None, None
    if out is not None:
        try:
            written = cert.write_checked(out)
        except CanError as err:
            write_error = one_line(err)
    if json_out:
        shown = cert.to_dict()
        if out is not None:
            shown["written_to"] = None if written is None else str(written)
        if write_error:
            shown["output_error"] = write_error
        echo_json(shown)
    else:
        print_certificate(cert, f"CAN dual certificate — {scores.name}")
        if cert.bias:
            from train.cli.stability import print_bias

            print_bias(cert.bias)
        if written is not None and cert.converged:
            typer.echo(f"certificate written to {written}")
        elif written is not None:
            typer.echo(f"not converged: the certificate went to {written}; {out} was left as it was")
    if write_error:
        fail(write_error)
    if not cert.converged:
        typer.echo(f"error: not converged: {cert.message}", err=True)
        raise typer.Exit(int(ExitCode.NOT_CONVERGED))


MAX_SWEEP_POINTS = 1_000_000


def _parse_values(text: str, json_out: bool = False):
    """START:STOP:NUM or a comma-separated list; every value finite, no empty item, NUM in [1, 10^6]."""
    import numpy as np

    def bad(why):
        fail(f"--values {text!r}: {why}", json_out=json_out, status=Outcome.INVALID)

    try:
        if ":" in text:
            start, stop, num = text.split(":")
            start, stop, num = float(start), float(stop), int(num)
            if not (math.isfinite(start) and math.isfinite(stop)):
                bad("START and STOP must be finite")
            if not 1 <= num <= MAX_SWEEP_POINTS:
                bad(f"NUM must be between 1 and {MAX_SWEEP_POINTS:,}")
            return np.linspace(start, stop, num)
        items = text.split(",")
        if any(not v.strip() for v in items):
            bad("an item of the list is empty")
        values = np.array([float(v) for v in items])
    except ValueError:
        bad("use START:STOP:NUM or a comma-separated list of numbers")
    if not np.all(np.isfinite(values)):
        bad("every margin must be finite")
    return values


@app.command()
@defaults_from(DualConfig)
def sweep(
    scores: ScoresArg,
    reward: RewardOpt,
    beta: BetaOpt,
    constraint: ConstraintOpt = FROM_CONFIG,
    cost: CostOpt = FROM_CONFIG,
    vary: Annotated[Optional[str], typer.Option(help="Constraint whose margin is swept (default: the first).")] = None,
    values: Annotated[str, typer.Option(help="Margins for it: START:STOP:NUM or a comma-separated list.")] = "0:1:21",
    prompt_id: PromptIdOpt = FROM_CONFIG,
    float32: Float32Opt = FROM_CONFIG,
    plot: Annotated[Path, typer.Option(help="Where to write the plot (PNG).")] = Path("sweep.png"),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not write a plot.")] = False,
    json_out: JsonOpt = False,
    drop_bad_rows: DropOpt = FROM_CONFIG,
    chunk: Annotated[int, typer.Option(help="Grid points solved at once (vmapped); bounds the memory.")] = 64,
):
    """λ*(b) along a grid of margins for one constraint (the others fixed), with predicted gains and a plot.

    Grid points are solved CHUNK at a time (vmapped), with a progress bar for long sweeps. Points beyond the
    reachable edge are marked infeasible.
    """
    check_beta(beta, json_out)
    grid_values = _parse_values(values, json_out)
    setup_jax()
    from can_jax.errors import CanError
    from can_jax.result import Status

    loaded = load_limited(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows)
    names = loaded.names
    name = vary or names[0]
    if name not in names:
        fail(f"--vary {name!r} is not one of the constraints {names}", json_out=json_out, status=Outcome.INVALID)
    j = names.index(name)
    res = _sweep_chunks(loaded, j, grid_values, beta, chunk, show_progress=not json_out)
    status = res["status"]
    lam, gains = res["x"], res["utility_gain"]
    ok = status == Status.CONVERGED

    def num(x):
        x = float(x)
        return x if math.isfinite(x) else None

    rows = []
    for i, b in enumerate(grid_values):
        rows.append(
            {
                "margin": float(b),
                "status": Status(int(status[i])).label,
                "lambda": {n: (num(lam[i, k]) if ok[i] else None) for k, n in enumerate(names)},
                "predicted_gain": {n: (num(gains[i, k]) if ok[i] else None) for k, n in enumerate(names)},
                "reward_gain": num(res["reward_gain"][i]) if ok[i] else None,
                "kl": num(res["kl"][i]) if ok[i] else None,
            }
        )
    plot_error = None
    if not no_plot:
        labels = [f"{n} (−cost)" if kd == "cost" else n for n, kd in zip(names, loaded.kinds)]
        try:
            _plot_sweep(plot, name, labels, grid_values, lam, gains, res, ok)
        except CanError as err:
            plot_error = one_line(err)
    if json_out:
        payload = {"status": Outcome.OK.value, "message": f"{int(ok.sum())} of {len(rows)} points converged",
                   "vary": name, "beta": beta, "points": rows}  # fmt: skip
        if plot_error:
            payload["output_error"] = plot_error
        echo_json(payload)
    else:
        _print_sweep(rows, names, name, beta, lam, ok)
        if not no_plot and plot_error is None:
            typer.echo(f"plot written to {plot}")
    if plot_error:
        fail(plot_error)


def _sweep_chunks(loaded, j: int, values, beta: float, chunk: int, show_progress: bool = True) -> dict:
    """Solves the sweep's points `chunk` at a time (vmapped within a chunk; the last chunk is padded so one
    compilation serves all): memory is bounded by the chunk, and a progress bar shows long sweeps."""
    import jax.numpy as jnp
    import numpy as np
    from rich.progress import Progress

    from can_jax.sweep import margin_grid, sweep_jit

    data = loaded.for_solve(1)  # the packed layout on one CPU device
    dtype = data.x.dtype if hasattr(data, "x") else data.reward.dtype
    base = jnp.asarray(loaded.margins, dtype)
    size = min(chunk, len(values))
    parts = []
    with Progress(transient=True, disable=not show_progress or len(values) <= size) as bar:
        task = bar.add_task("sweep", total=len(values))
        for start in range(0, len(values), size):
            part = np.asarray(values[start : start + size])
            padded = np.concatenate([part, np.full(size - len(part), part[-1])])
            res = sweep_jit(data, margin_grid(base, j, jnp.asarray(padded, dtype)), beta)
            n = len(part)
            parts.append({"x": np.asarray(res.x)[:n], "status": np.asarray(res.status)[:n],
                          "utility_gain": np.asarray(res.predicted.utility_gain)[:n],
                          "reward_gain": np.asarray(res.predicted.reward_gain)[:n],
                          "kl": np.asarray(res.predicted.kl)[:n]})  # fmt: skip
            bar.advance(task, n)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _print_sweep(rows, names, name, beta, lam, ok):
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
    console().print(table)


def _plot_sweep(path, name, names, values, lam, gains, res, ok):
    import numpy as np

    from bridge.files import pyplot, write_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for k, n in enumerate(names):
        axes[0].plot(values[ok], lam[ok, k], marker=".", label=n)
        axes[1].plot(values[ok], gains[ok, k], marker=".", label=n)
    axes[1].plot(values[ok], values[ok], "k:", lw=1, label="b (target)")
    reward_gain = np.asarray(res["reward_gain"])
    kl = np.asarray(res["kl"])
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
    write_figure(path, fig, dpi=110)
