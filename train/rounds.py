"""The rounds report of `can refine`: one row per round (λ, the predicted, in-sample, calibration and held-out gains
of each constraint and of the reward, the KL), OUT/rounds.json (`bridge.reports.RoundsReport`), its markdown table
and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bridge.reports import EvaluationReport, RoundsReport, cell
from bridge.tables import sign_of
from train.chain import RefineConfig


def round_row(n, cert, cal: EvaluationReport, test: EvaluationReport | None, insample, g, tol, stop, names,
              seconds, seconds_aligning=None) -> dict:  # fmt: skip
    """Round n's row: λ, and for each constraint and the reward the predicted, in-sample, calibration and held-out
    gains; `seconds` measuring it, `seconds_aligning` relabelling and aligning its policy (None for round 0)."""
    reward, kinds = cert.reward, dict(zip(cert.names, cert.kinds, strict=True))
    row = {"round": n, "certificate_sha256": cert.sha256, "lambda": cert.lam, "stop": bool(stop),
           "seconds_measuring": round(seconds, 1), "gains": {}}  # fmt: skip
    for j, name in enumerate(names):
        row["gains"][name] = {
            "predicted": cert.predicted_gains[name],
            "insample": None if insample is None else sign_of(kinds[name]) * insample[name],
            "calibration": cal.row(name).achieved_gain, "calibration_half_width": float(g["half_width"][j]),
            "tolerance": float(tol[j]),
            "held_out": test.row(name).achieved_gain if test else None,
            "held_out_ci95": list(test.row(name).ci95) if test else None,
        }  # fmt: skip
    row["reward"] = {"predicted": cert.predicted_reward_gain, "calibration": cal.row(reward).achieved_gain,
                     "held_out": test.row(reward).achieved_gain if test else None,
                     "held_out_ci95": list(test.row(reward).ci95) if test else None}  # fmt: skip
    row["kl"] = ((test or cal).text or {}).get("kl")
    row["seconds_aligning"] = None if seconds_aligning is None else round(seconds_aligning, 1)
    return row


def say_round(row, names) -> str:
    parts = []
    for name in names:
        c = row["gains"][name]
        held = "" if c["held_out"] is None else f", held out {c['held_out']:+.3f}"
        parts.append(f"{name} {c['calibration']:+.3f} ± {c['calibration_half_width']:.3f}{held}")
    return f"round {row['round']}: calibration gains " + "; ".join(parts)


def rounds_report(rows: list, stopped: bool | None, names: list, margins, out: Path, cfg: RefineConfig,
                  write: bool = False) -> RoundsReport:  # fmt: skip
    """The rounds report (`stopped` None while the run is under way); with `write` also OUT/rounds.json, its markdown
    table OUT/rounds.md and its plot OUT/rounds.png (atomic writes)."""
    from bridge.files import atomic_write_text, write_figure

    margins = [float(b) for b in margins]
    report = RoundsReport.build(rounds=rows, stopped=stopped, names=names, margins=margins, out=str(out),
                                settings=json.loads(json.dumps(cfg.chain_settings(), default=str)))  # fmt: skip
    if write:
        report.write(out / "rounds.json")
        atomic_write_text(out / "rounds.md", rounds_markdown(rows, names, margins, cfg))
        write_figure(out / "rounds.png", plot_rounds(rows, names, margins))
    return report


def rounds_markdown(rows: list, names: list, margins: list, cfg: RefineConfig) -> str:
    lines = [f"# Correction rounds ({cfg.step} step{f', η = {cfg.eta:g}' if cfg.step == 'caid' else ''}; DPO "
             f"{'from π_ref' if cfg.start == 'reference' else 'continuing from the previous round'})", "",
             f"Calibration: {len(cfg.prompts)} prompts × {cfg.k} samples per policy; "
             + (f"held out: {len(cfg.test_prompts)} prompts × {cfg.test_k} samples (never used to steer). "
                if cfg.test_prompts else "no held-out prompts given. ")
             + f"Stopping rule: every active constraint's calibration gain within max({cfg.floor:g}, h) of its "
             f"margin and every slack one at least its margin less that, with h the half-width of the m = "
             f"{len(names)} intervals at joint level {cfg.level:g} (Bonferroni).", ""]  # fmt: skip
    head = "| round | constraint | margin b | λ | predicted | on training samples | calibration ± h | held out [95%] |"
    lines += [head, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for j, name in enumerate(names):
            c = row["gains"][name]
            held = "—" if c["held_out"] is None else (f"{c['held_out']:+.3f} [{c['held_out_ci95'][0]:+.3f}, "
                                                      f"{c['held_out_ci95'][1]:+.3f}]")  # fmt: skip
            lines.append(f"| {row['round']} | {name} | {margins[j]:+.3f} | {row['lambda'][name]:.4g} | "
                         f"{cell(c['predicted'])} | {cell(c['insample'])} | {c['calibration']:+.3f} ± "
                         f"{c['calibration_half_width']:.3f} | {held} |")  # fmt: skip
    lines += ["", "| round | reward: predicted | reward held out [95%] | KL (nats) | stop |", "|---|---|---|---|---|"]
    for row in rows:
        r = row["reward"]
        held = (
            "—"
            if r["held_out"] is None
            else f"{r['held_out']:+.3f} [{r['held_out_ci95'][0]:+.3f}, {r['held_out_ci95'][1]:+.3f}]"
        )
        lines.append(f"| {row['round']} | {cell(r['predicted'])} | {held} | {cell(row['kl'], '.2f')} | "
                     f"{'yes' if row['stop'] else 'no'} |")  # fmt: skip
    lines += ["", "![rounds](rounds.png)", ""]
    return "\n".join(lines)


def plot_rounds(rows: list, names: list, margins: list):
    """The rounds' plot: per constraint, the predicted, in-sample, calibration and held-out gains against the margin
    (a matplotlib figure)."""
    from bridge.files import pyplot

    plt = pyplot()

    x = np.array([r["round"] for r in rows])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for j, (name, ax) in enumerate(zip(names, axes[0], strict=True)):
        c = [r["gains"][name] for r in rows]
        ax.axhline(margins[j], color="k", lw=0.8, ls="--", label="margin b")
        ax.plot(x, [v["predicted"] for v in c], "o-", label="predicted (certificate)")
        if any(v["insample"] is not None for v in c):
            ax.plot(x, [np.nan if v["insample"] is None else v["insample"] for v in c], "s-",
                    label="on the training samples")  # fmt: skip
        ax.errorbar(x - 0.05, [v["calibration"] for v in c], yerr=[v["calibration_half_width"] for v in c], fmt="^-",
                    capsize=3, label="calibration (± simultaneous h)")  # fmt: skip
        if any(v["held_out"] is not None for v in c):
            held = np.array([np.nan if v["held_out"] is None else v["held_out"] for v in c])
            lo = np.array([np.nan if v["held_out"] is None else v["held_out"] - v["held_out_ci95"][0] for v in c])
            hi = np.array([np.nan if v["held_out"] is None else v["held_out_ci95"][1] - v["held_out"] for v in c])
            ax.errorbar(x + 0.05, held, yerr=[lo, hi], fmt="d-", capsize=3, label="held out (95%)")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.set_xticks(x)
    axes[0][0].set_ylabel("gain over π_ref")
    axes[0][-1].legend(fontsize=7)
    return fig
