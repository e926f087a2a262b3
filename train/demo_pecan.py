"""`can demo --pecan`: the preference-only chain (PeCAN, DESIGN §3) beside MoCAN on the embedded default.

PeCAN never sees a score: it gets one preference dataset per aspect. The demo makes them the way an annotator
would — pairs of reference samples labelled by which one is more helpful, more harmless, more polite (the
lexical scorers stand in for the annotators) — and then runs the PeCAN chain on the same reference samples as
MoCAN: pre-align one model per aspect (DPO, KL weight β), record every sample's log-ratio under each, solve the
dual with E_ref from the token-level KL, label from s̃ = r̃ + λ*ᵀg̃, one DPO run, and evaluate with the scorers.
The report sets PeCAN's achieved gains beside MoCAN's, with what each certificate implies in scorer units.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bridge.files import atomic_write_text, pyplot, write_figure, write_parquet
from bridge.reports import EvaluationReport, cell
from can_jax.errors import CanError


def implied_gains(scores_path, cert, scorers: list[str]) -> dict:
    """What π_λ* of a PeCAN certificate does to the scorers' means on the samples: the self-normalised weights of
    s̃ = r̃ + λ*ᵀg̃ (DESIGN §2) applied to the scorer columns — the prediction in the units evaluation measures."""
    from bridge.labels import signed_scores
    from bridge.tables import read_table
    from can_jax.certify import tilt_gains

    table = read_table(scores_path)
    g = np.stack([np.asarray(table.column(n).to_numpy(zero_copy_only=False), float) for n in scorers], 1)
    gains = tilt_gains(table.column("prompt_id").to_numpy(), signed_scores(table, cert.score_weights()), g, cert.beta)
    return {n: float(v) for n, v in zip(scorers, gains, strict=True)}


def run_pecan(cfg, out: str | Path, mocan_dir: str | Path, say=print, prealign_pairs: int = 4,
              prealign_epochs: float = 1.0, prealign_lr: float | None = None, kl: str = "token") -> dict:  # fmt: skip
    """PeCAN into OUT, reusing the reference samples of the MoCAN run in MOCAN_DIR; returns the comparison."""
    from bridge.certificate import Certificate
    from bridge.dual import DualConfig, margins_at_reach
    from bridge.dual import run as run_dual
    from bridge.labels import score_preferences
    from bridge.tables import read_table
    from train.dpo import prealign
    from train.dpo import run as train
    from train.evaluate import EvaluateConfig, insample_gains
    from train.evaluate import run as evaluate
    from train.label import LabelConfig
    from train.label import run as run_label
    from train.logratios import LogratiosConfig, add_aligned
    from train.scorers import parse_scorer
    from train.settings import TrainConfig

    out, mocan_dir = Path(out), Path(mocan_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = mocan_dir / "scores.parquet"
    scorer_names = [parse_scorer(s)[0] for s in cfg.scorers]
    aspects = [cfg.reward] + [n for n in scorer_names if n != cfg.reward]
    times = {}

    t = time.perf_counter()
    aligned = []
    for i, name in enumerate(aspects):
        prefs, stats = score_preferences(samples, name, prealign_pairs, cfg.seed + i)
        write_parquet(out / f"prefs_{name}.parquet", prefs)
        settings = cfg.dpo_settings(epochs=prealign_epochs, lr=prealign_lr or cfg.dpo.lr)
        policy = prealign(TrainConfig(preferences=str(out / f"prefs_{name}.parquet"), policy=cfg.policy,
                                      out=str(out / f"pre_{name}"), beta_override=cfg.beta, dpo=settings,
                                      overwrite=True))  # fmt: skip
        aligned.append(f"pre_{name}={policy}")
        say(f"Ⓐ pre-aligned π_{name} on {stats.pairs} preference pairs ({stats.ties_dropped} ties dropped)")
    times["prealign"] = time.perf_counter() - t

    t = time.perf_counter()
    lcfg = LogratiosConfig(aligned=aligned, out=str(out / "pecan_scores.parquet"), policy=cfg.policy,
                           max_length=cfg.max_length, batch_size=cfg.gen_batch_size)  # fmt: skip
    table = add_aligned(lcfg, samples)
    names = [f"pre_{n}" for n in aspects]
    refs = {n: f"ref_{n}" for n in names[1:]} if kl == "token" else None
    margins = margins_at_reach(table, names[0], names[1:], cfg.beta, cfg.margin_frac, ref_columns=refs)
    cert = run_dual(DualConfig(scores=str(table), reward=names[0], beta=cfg.beta, constraint=margins, pecan=True,
                               kl=kl))  # fmt: skip
    if not cert.converged:
        raise CanError(f"the PeCAN dual did not converge: {cert.message}")
    cert.write(out / "certificate.json")
    times["logps+dual"] = time.perf_counter() - t
    say(f"Ⓑ PeCAN dual on the MoCAN samples' log-ratios: λ* { ({k: round(v, 4) for k, v in cert.lam.items()}) }"
        f", {cert.status}; KL(π_ref‖π_g) token vs sample: "
        + ", ".join(f"{n} {r['token']:.3f}±{r['token_se']:.3f} / {r['sample']:.3f}±{r['sample_se']:.3f}"
                    for n, r in cert.pecan["kl"].items()))  # fmt: skip

    t = time.perf_counter()
    _, stats = run_label(LabelConfig(scores=str(table), certificate=str(out / "certificate.json"),
                                     out=str(out / "preferences.parquet"), mode=cfg.mode,
                                     pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed))  # fmt: skip
    final = train(TrainConfig(preferences=str(out / "preferences.parquet"), policy=cfg.policy, out=str(out / "run"),
                              dpo=cfg.dpo_settings(), overwrite=True))  # fmt: skip
    times["label+train"] = time.perf_counter() - t
    say(f"Ⓒ {stats.pairs} {cfg.mode} pairs from s̃ = r̃ + λ*ᵀg̃, one DPO run → {final}")

    t = time.perf_counter()
    mocan_cert = Certificate.read(mocan_dir / "certificate.json")
    insample = insample_gains(str(final), read_table(table), scorer_names, cfg.gen_batch_size, cfg.max_length)
    ecfg = EvaluateConfig(aligned=str(final), reference=cfg.policy, scorers=tuple(cfg.scorers),
                          out=str(out / "evaluation"), k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.gen_batch_size, seed=cfg.seed + 1)  # fmt: skip
    report = evaluate(ecfg, mocan_cert, cfg.eval_prompts, insample)
    times["evaluate"] = time.perf_counter() - t
    mocan = EvaluationReport.read(mocan_dir / "evaluation" / "evaluation.json")
    implied = implied_gains(table, cert, scorer_names)
    comparison = compare(mocan, report, mocan_cert, cert, implied, times)
    atomic_write_text(out / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    atomic_write_text(out / "comparison.md", markdown(comparison))
    plot(comparison, out / "comparison.png")
    say(f"Ⓓ evaluated; MoCAN vs PeCAN: {out / 'comparison.md'}")
    return comparison


def compare(mocan: EvaluationReport, pecan: EvaluationReport, mocan_cert, pecan_cert, implied: dict,
            times: dict) -> dict:  # fmt: skip
    rows = []
    for r in mocan.rows:
        p = pecan.row(r.name)
        rows.append({"name": r.name, "role": r.role, "mocan_predicted": r.predicted_gain,
                     "mocan_insample": r.insample_gain, "mocan_achieved": r.achieved_gain,
                     "mocan_ci95": list(r.ci95), "pecan_implied": implied.get(r.name),
                     "pecan_insample": p.insample_gain, "pecan_achieved": p.achieved_gain,
                     "pecan_ci95": list(p.ci95)})  # fmt: skip
    return {"prompts": mocan.prompts, "samples_per_prompt": mocan.samples_per_prompt, "beta": mocan.beta,
            "mocan_lambda": mocan_cert.lam, "pecan_lambda": pecan_cert.lam,
            "pecan_margins": pecan_cert.margins, "pecan_kl": pecan_cert.pecan["kl"], "rows": rows,
            "pecan_seconds": times}  # fmt: skip


def markdown(c: dict) -> str:
    lines = [
        f"# MoCAN vs PeCAN ({c['prompts']} held-out prompts × {c['samples_per_prompt']} samples per policy, "
        f"β = {c['beta']:g})",
        "",
        "MoCAN solved the dual on the scorers' values; PeCAN only on preference pairs (via one pre-aligned model per "
        "aspect). Both aligned the same reference on the same reference samples; gains are measured with the scorers.",
        "",
        f"- MoCAN λ*: {c['mocan_lambda']}",
        f"- PeCAN λ*: {c['pecan_lambda']} (margins {c['pecan_margins']}, in β·log-ratio units)",
        "",
        "| score | role | MoCAN predicted | MoCAN on training samples | MoCAN achieved, held out [95%] | PeCAN implied "
        "| PeCAN on training samples | PeCAN achieved, held out [95%] |",
        "|---|---|---|---|---|---|---|---|",
    ]

    for r in c["rows"]:
        lines.append(
            f"| {r['name']} | {r['role']} | {cell(r['mocan_predicted'])} | {cell(r.get('mocan_insample'))} | "
            f"{cell(r['mocan_achieved'])} [{r['mocan_ci95'][0]:+.3f}, {r['mocan_ci95'][1]:+.3f}] | "
            f"{cell(r['pecan_implied'])} | {cell(r.get('pecan_insample'))} | "
            f"{cell(r['pecan_achieved'])} [{r['pecan_ci95'][0]:+.3f}, {r['pecan_ci95'][1]:+.3f}] |"
        )
    lines += [
        "",
        "PeCAN implied: the scorer gains that PeCAN's π_λ* (weights of s̃ = r̃ + λ*ᵀg̃ on the reference samples) "
        "would bring — what PeCAN predicts, in the units MoCAN and the evaluation use. On training samples: each "
        "aligned policy's gains on those reference samples, reweighted by π_aligned/π_ref.",
        "",
        "KL(π_ref ‖ π_g) per prompt, token-level vs sample-mean estimate (± mean within-prompt s.e.):",
        "",
    ]
    for n, r in c["pecan_kl"].items():
        lines.append(f"- {n}: token {r['token']:.4f} ± {r['token_se']:.4f}, sample {r['sample']:.4f} ± "
                     f"{r['sample_se']:.4f}, correlation {r['correlation']:.2f}")  # fmt: skip
    lines += ["", "![comparison](comparison.png)"]
    return "\n".join(lines) + "\n"


def plot(c: dict, path) -> None:
    plt = pyplot()

    rows = c["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 2.0 * len(rows)), 3.8))
    for off, key, label in ((-0.3, "mocan", "MoCAN"), (0.1, "pecan", "PeCAN")):
        pred = [np.nan if r[f"{key}_predicted" if key == "mocan" else "pecan_implied"] is None
                else r[f"{key}_predicted" if key == "mocan" else "pecan_implied"] for r in rows]  # fmt: skip
        ach = np.array([r[f"{key}_achieved"] for r in rows])
        err = np.array([[a - r[f"{key}_ci95"][0], r[f"{key}_ci95"][1] - a] for a, r in zip(ach, rows)]).T
        ax.bar(x + off, pred, 0.2, alpha=0.45, label=f"{label} predicted")
        ax.bar(x + off + 0.2, ach, 0.2, yerr=err, capsize=3, label=f"{label} achieved (95% CI)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_ylabel("gain over the reference policy")
    ax.legend(fontsize=7, ncol=2)
    write_figure(path, fig)
