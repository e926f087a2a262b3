"""`can refine`: correction rounds on a real model until the achieved gains reach the margins (DESIGN §7).

A round, from the aligned policy of round n − 1: measure the achieved gains on calibration prompts (`train.evaluate`);
stop if `can_jax.refine.stop_rule` holds; else take the correction step of `can_jax.refine`, write the round-n
certificate (`bridge.dual.round_certificate`, linked to round n − 1's by hash), relabel, run DPO again, and measure.
OUT/round-N/ holds each round's files; a finished file is never rewritten, so a killed run resumes when run again
with the same command. OUT/rounds.md, .json and .png hold the rounds table and plot (`train.rounds`).
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from bridge.reports import EvaluationReport, RoundsReport
from train.chain import RefineConfig, open_chain
from train.rounds import round_row, rounds_report, say_round


def refine(cfg: RefineConfig, say=print, reference_memo: dict | None = None) -> RoundsReport:
    """Runs (or resumes) the correction rounds in cfg.out; returns the rounds report (OUT/rounds.json)."""
    from bridge.dual import round_certificate, sensitivity_at
    from can_jax.refine import next_lambda, stop_rule
    from train import dist

    cfg, cert0, policy0, loaded = open_chain(cfg)
    names = cert0.names
    st = dist.state()
    out = Path(cfg.out)
    memo = {} if reference_memo is None else reference_memo
    margins = np.array([cert0.margins[n] for n in names], float)
    hess0 = None
    rows, history = [], []
    cert, policy, n = cert0, policy0, 0
    align_s = 0.0
    stopped = False
    while True:
        t0 = time.perf_counter()
        folder = out / f"round-{n}"
        cal = _measure(cfg, policy, cert, cfg.prompts, cfg.k, cfg.seed, folder / "calibration", memo)
        test = None
        if cfg.test_prompts:
            test = _measure(cfg, policy, cert, cfg.test_prompts, cfg.test_k, cfg.test_seed, folder / "test", memo)
        insample = _insample(cfg, policy, folder) if cfg.insample else None
        g = cal.gains(names, cfg.level)
        lam = np.array([cert.lam[x] for x in names], float)
        stop, tol = stop_rule(g["gain"], g["half_width"], margins, lam > 0, cfg.floor)
        rows.append(round_row(n, cert, cal, test, insample, g, tol, stop, names, time.perf_counter() - t0,
                              None if n == 0 else align_s))  # fmt: skip
        history.append((lam, g["gain"]))
        say(say_round(rows[-1], names))
        rounds_report(rows, None, names, margins, out, cfg, write=st.is_main_process)
        if stop:
            stopped = True
            say(f"round {n}: every constraint is within its tolerance of its margin: stopping")
            break
        if n >= cfg.rounds:
            break
        n += 1
        t0 = time.perf_counter()
        if hess0 is None:
            hess0 = sensitivity_at(loaded, cert0)
        lam_next = next_lambda([h[0] for h in history], [h[1] for h in history], margins, hess0, cfg.step, cfg.eta,
                               cfg.secant)  # fmt: skip
        record = {"step": cfg.step, **({"eta": cfg.eta} if cfg.step == "caid" else {}),
                  "measured_gains": dict(zip(names, g["gain"].tolist(), strict=True)),
                  "measured_half_width": dict(zip(names, g["half_width"].tolist(), strict=True))}  # fmt: skip
        # Solved and written once by the main process and handed to the others; a resumed run reads it back.
        cert = dist.shared(st, partial(round_certificate, loaded, cert, lam_next, n,
                                       out / f"round-{n}" / "certificate.json", **record))  # fmt: skip
        say(f"round {n}: λ {dict(zip(names, np.round(lam_next, 4).tolist(), strict=True))} ({cfg.step} step); "
            f"predicted gains on the samples {cert.predicted_gains}")  # fmt: skip
        policy = _align(cfg, cert, policy, out / f"round-{n}", say)
        align_s = time.perf_counter() - t0
        say(f"round {n}: relabelled and aligned in {align_s:.0f} s → {policy}")
    report = rounds_report(rows, stopped, names, margins, out, cfg, write=st.is_main_process)
    st.wait_for_everyone()
    return report


def _measure(cfg, policy, cert, prompts, k, seed, folder: Path, memo) -> EvaluationReport:
    """A policy's achieved gains on prompts (the `can evaluate` report), read back if that round already has it."""
    from train.evaluate import EvaluateConfig
    from train.evaluate import run as evaluate

    done = folder / "evaluation.json"
    if done.is_file():
        return EvaluationReport.read(done)
    ecfg = EvaluateConfig(aligned=policy, reference=cfg.reference, scorers=tuple(cfg.scorers), out=str(folder), k=k,
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=seed,
                          chat_template=cfg.chat_template, scorer_options=cfg.scorer_options,
                          dtype=cfg.dtype)  # fmt: skip
    return evaluate(ecfg, cert, list(prompts), reference_memo=memo)


def _insample(cfg, policy, folder: Path) -> dict:
    from bridge.files import atomic_write_text
    from train import dist
    from train.evaluate import insample_gains
    from train.scorers import parse_scorer

    path = folder / "insample.json"
    if path.is_file():
        return json.loads(path.read_text())
    gains = insample_gains(policy, cfg.scores.table, [parse_scorer(s)[0] for s in cfg.scorers], cfg.gen_batch_size,
                           cfg.dpo.max_length, cfg.dtype)  # fmt: skip
    if dist.state().is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(gains, indent=2) + "\n")
    return gains


def _align(cfg, cert, previous: str, folder: Path, say) -> str:
    """Relabels the π_ref samples under round n's certificate and runs DPO (resuming its checkpoints)."""
    from train import dist
    from train.dpo import run as train
    from train.label import LabelConfig
    from train.label import run as run_label
    from train.settings import TrainConfig

    st = dist.state()
    prefs = folder / "preferences.parquet"
    if st.is_main_process and not prefs.is_file():
        _, stats = run_label(LabelConfig(scores=cfg.scores, certificate=str(folder / "certificate.json"),
                                         out=str(prefs), mode=cfg.mode, pairs_per_prompt=cfg.pairs_per_prompt,
                                         seed=cfg.label_seed))  # fmt: skip
        say(f"round {cert.round_index}: {stats.pairs} {cfg.mode} pairs → {prefs}")
    st.wait_for_everyone()
    final = folder / "run" / "policy"
    if (final / "certificate.json").is_file():  # written last by `can train`: the run finished
        return str(final)
    continuing = cfg.start == "previous"
    start = previous if continuing else cfg.reference
    return str(train(TrainConfig(preferences=str(prefs), policy=start, out=str(folder / "run"), dpo=cfg.dpo,
                                 resume=True, overwrite=True, reference=cfg.reference if continuing else None)))


