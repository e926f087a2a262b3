"""`can stability` (DESIGN §7): λ̂ and the predicted outcome as prompts and responses per prompt are
subsampled (the paper's response-count study, built in), with the finite-K jackknife beside the plain estimate, a
plot, and an "is K enough" verdict with its reason. Also the bias table `can dual --bias` prints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from bridge.dual import DualConfig
from bridge.reports import cell
from can_jax.errors import Outcome
from train.cli.app import (
    AtLeastOpt,
    BetaOpt,
    ConstraintOpt,
    CostAtMostOpt,
    CostOpt,
    DropOpt,
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
    setup_jax,
)
from train.cli.options import FROM_CONFIG, defaults_from


def print_bias(block: dict):
    """The certificate's `bias` block as a table: plain, estimated bias, corrected ± s.e., 95% interval."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"finite-K bias — {block['method']}")
    for col in ("estimate", "plain", "± s.e.", "bias", "corrected", "± s.e.", "95% interval (corrected)", "bias/s.e."):
        table.add_column(col, justify="left" if col == "estimate" else "right")
    rows = [(f"λ[{n}]", e) for n, e in block["lambda"].items()]
    rows += [(f"gain {n}", e) for n, e in block["predicted"]["utility_gains"].items()]
    rows += [("reward gain", block["predicted"]["reward_gain"]), ("KL", block["predicted"]["kl"])]
    for label, e in rows:
        iv = e["interval_95"]
        table.add_row(
            escape(label),
            cell(e["plain"], ".4g"),
            cell(e["plain_standard_error"], ".2g"),
            cell(e["bias"], "+.3g"),
            cell(e["corrected"], ".4g"),
            cell(e["standard_error"], ".2g"),
            "—" if iv is None or None in iv else f"[{iv[0]:.4g}, {iv[1]:.4g}]",
            cell(e["bias_over_se"], ".2f"),
        )
    console().print(table)  # its warnings are among the certificate's diagnostics, printed with them


def subsample_masks(mask, ks, fractions, seed: int = 0):
    """Masks and prompt weights for each (K', fraction of prompts): the first K' responses of each prompt in a
    random order, and a random fraction of the prompts (weight 0 for the others). Same shapes throughout, so one
    compiled solve serves every point. Returns a list of (k, fraction, mask [N, K], weight [N])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mask = np.asarray(mask, bool)
    n, k_max = mask.shape
    order = np.argsort(np.where(mask, rng.random(mask.shape), np.inf), axis=1)  # real responses first, shuffled
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k_max)[None, :].repeat(n, 0), axis=1)
    prompt_order = rng.permutation(n)
    out = []
    for f in fractions:
        keep = np.zeros(n, bool)
        keep[prompt_order[: max(2, int(round(f * n)))]] = True
        for k in ks:
            out.append((int(k), float(f), mask & (rank < k), keep.astype(float)))
    return out


def verdict(rows: list[dict], names: list[str]) -> tuple[bool, str]:
    """'Is K enough' from the full-data row: every active λ's and prediction's |bias| ≤ SMALL s.e.; else how many
    responses per prompt would make it so (the bias falls like 1/K, the s.e. hardly moves with K)."""
    from bridge.bias import SMALL

    full = max(rows, key=lambda r: (r["fraction"], r["k"]))
    worst, label = 0.0, None
    for key, items in (("lambda", full["lambda"]), ("gain", full["gain"])):
        for n in names:
            e = items[n]
            if key == "lambda" and not e["plain"] > 0:
                continue
            r = e["bias_over_se"]
            if r is not None and r > worst:
                worst, label = r, (f"λ[{n}]" if key == "lambda" else f"the predicted gain of {n}")
    for key, text in (("kl", "the predicted KL"), ("reward_gain", "the predicted reward gain")):
        r = full[key]["bias_over_se"]
        if r is not None and r > worst:
            worst, label = r, text
    k = full["k_mean"]
    ratios = [e["bias_over_se"] for items in (full["lambda"], full["gain"]) for e in items.values()]
    ratios += [full[key]["bias_over_se"] for key in ("kl", "reward_gain")]
    if all(r is None for r in ratios):
        return False, (
            f"cannot tell whether K is enough: no standard error could be estimated at {k:.3g} responses per prompt "
            f"on {full['prompts']} prompts (too few prompts, or no spread between them)"
        )
    if label is None or worst <= SMALL:
        return True, (
            f"K is enough: with {k:.3g} responses per prompt the estimated finite-K bias is at most {worst:.2f} "
            f"standard errors (threshold {SMALL}), so the plain intervals are honest"
        )
    need = math.ceil(k * worst / SMALL)
    return False, (
        f"K is not enough: {label} is biased by {worst:.1f} standard errors at {k:.3g} responses per prompt; the bias "
        f"falls like 1/K, so about K ≥ {need} would bring it under {SMALL} s.e. — until then use the corrected "
        "estimates (`can dual --bias`)"
    )


@app.command()
@defaults_from(DualConfig)
def stability(
    scores: ScoresArg,
    reward: RewardOpt,
    beta: BetaOpt,
    constraint: ConstraintOpt = FROM_CONFIG,
    cost: CostOpt = FROM_CONFIG,
    prompt_id: PromptIdOpt = FROM_CONFIG,
    float32: Float32Opt = FROM_CONFIG,
    drop_bad_rows: DropOpt = FROM_CONFIG,
    plot: Annotated[Path, typer.Option(help="Where to write the plot (PNG).")] = Path("stability.png"),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not write a plot.")] = False,
    fractions: Annotated[
        str, typer.Option(help="Fractions of the prompts to subsample, comma-separated.")
    ] = "0.25,0.5,1",
    seed: Annotated[int, typer.Option(help="Seed of the subsampling.")] = 0,
    json_out: JsonOpt = False,
    cost_at_most: CostAtMostOpt = FROM_CONFIG,
    at_least: AtLeastOpt = FROM_CONFIG,
):
    """Is K enough? λ* and the predicted outcome as prompts and responses per prompt are subsampled, plain and
    jackknife-corrected (DESIGN §7), with a plot and a verdict.

    Example: can stability scores.parquet --reward helpful --cost harm=0.5 --beta 0.1
    Safe-RLHF-style limit: can stability scores.parquet --reward reward --cost-at-most cost=0 --beta 0.1
    """
    check_beta(beta, json_out)
    try:
        fracs = sorted({float(f) for f in fractions.split(",")})
    except ValueError:
        fail(f"--fractions {fractions!r}: use comma-separated numbers in (0, 1]", json_out=json_out,
             status=Outcome.INVALID)
    if not fracs or not all(0 < f <= 1 for f in fracs):
        fail(f"--fractions {fractions!r}: every fraction must be in (0, 1]", json_out=json_out,
             status=Outcome.INVALID)
    setup_jax()
    import jax.numpy as jnp
    import numpy as np

    from bridge.bias import entry
    from can_jax.bias import finite_k_bias_jit
    from can_jax.result import Status
    from can_jax.solve import solve_dual_jit

    loaded = load_limited(scores, reward, constraint, cost, prompt_id, float32, drop_bad_rows, cost_at_most, at_least)
    sc = loaded.scores
    names = loaded.names
    margins = jnp.asarray(loaded.margins, sc.reward.dtype)
    k_max = int(sc.mask.shape[1])
    ks = sorted({k for k in (2, 4, 8, 16, 32, 64, 128, 256, 512) if k < k_max} | {k_max})
    if k_max < 2:
        fail("every prompt has one response: nothing to subsample (K ≥ 2 needed)", json_out=json_out)
    n_prompts = int(np.asarray(sc.mask).any(axis=1).sum())
    if n_prompts < 2:
        fail(f"{n_prompts} prompt in {scores}: stability needs at least 2 prompts (its standard errors are over "
             "prompts)", json_out=json_out, status=Outcome.BAD_INPUT)  # fmt: skip
    rows = []
    for k, f, mask, weight in subsample_masks(np.asarray(sc.mask), ks, fracs, seed):
        sub = sc._replace(mask=jnp.asarray(mask), weight=jnp.asarray(weight, sc.reward.dtype) * sc.weight)
        res = solve_dual_jit(sub, margins, beta)
        row = {"k": k, "fraction": f, "status": Status(int(res.status)).label}
        real = (weight > 0) & mask.any(axis=1)
        row["prompts"] = int(real.sum())
        row["k_mean"] = float(mask.sum(axis=1)[real].mean()) if real.any() else 0.0
        if int(res.status) == Status.CONVERGED:
            rep = finite_k_bias_jit(res.x, sub, margins, beta)
            row["lambda"] = {n: entry(rep.lam, j) for j, n in enumerate(names)}
            row["gain"] = {n: entry(rep.utility_gain, j) for j, n in enumerate(names)}
            row["reward_gain"] = entry(rep.reward_gain)
            row["kl"] = entry(rep.kl)
        rows.append(row)
    solved = [r for r in rows if "lambda" in r]
    full = [r for r in solved if r["k"] == k_max and r["fraction"] == max(fracs)]
    if not full:
        fail("the dual on the full table did not converge: run `can dual` first", json_out=json_out)
    ok, reason = verdict(full, names)
    if not no_plot:
        _plot(plot, solved, names, max(fracs))
    if json_out:
        echo_json({"enough": ok, "verdict": reason, "points": rows, "plot": None if no_plot else str(plot)})
        return
    _print_rows(rows, names)
    typer.echo(("" if ok else "warning: ") + reason)
    if not no_plot:
        typer.echo(f"plot written to {plot}")


def _print_rows(rows, names):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="λ* and predictions under subsampling (plain → corrected)")
    for col in ["prompts", "K"] + [f"λ[{n}]" for n in names] + [f"gain {n}" for n in names] + ["KL", "status"]:
        table.add_column(escape(col), justify="right")

    def pair(e):
        if e["plain"] is None:
            return "—"
        return f"{e['plain']:.4g} → {e['corrected']:.4g}" if e["corrected"] is not None else f"{e['plain']:.4g}"

    for r in rows:
        cells = [str(r["prompts"]), f"{r['k_mean']:.3g}"]
        if "lambda" in r:
            cells += [pair(r["lambda"][n]) for n in names] + [pair(r["gain"][n]) for n in names] + [pair(r["kl"])]
        else:
            cells += ["—"] * (2 * len(names) + 1)
        table.add_row(*cells, r["status"])
    console().print(table)


def _plot(path: Path, rows, names, frac):
    from bridge.files import pyplot, write_figure

    plt = pyplot()

    rows = sorted((r for r in rows if r["fraction"] == frac), key=lambda r: r["k"])
    ks = [r["k_mean"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for j, n in enumerate(names):
        for key, style, lab in (("plain", "o-", "plain"), ("corrected", "s--", "jackknife")):
            y = [r["lambda"][n][key] for r in rows]
            se = [r["lambda"][n]["plain_standard_error" if key == "plain" else "standard_error"] for r in rows]
            se = [0.0 if s is None else 1.96 * s for s in se]
            axes[0].errorbar(ks, [float("nan") if v is None else v for v in y], yerr=se, fmt=style, ms=4,
                             capsize=2, color=f"C{j}", label=f"λ[{n}] {lab}")  # fmt: skip
    for key, style, lab in (("plain", "o-", "plain"), ("corrected", "s--", "jackknife")):
        axes[1].plot(ks, [r["kl"][key] for r in rows], style, color="k", ms=4, label=f"KL {lab}")
        for j, n in enumerate(names):
            axes[1].plot(ks, [r["gain"][n][key] for r in rows], style, color=f"C{j}", ms=4, label=f"gain {n} {lab}")
    axes[0].set_title("λ̂ (± 1.96 s.e.) vs responses per prompt")
    axes[1].set_title("predicted outcome of π_λ̂ vs responses per prompt")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("responses per prompt K")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    write_figure(path, fig)
