"""`can refine` (issue 21): correction rounds on a real model until the achieved gains reach the margins.

One-shot CAN aligns at λ*, but DPO realises π_λ* only in part: on fresh prompts the achieved gains a(λ) fall short
of the certificate's predicted p(λ*) = b. A round, starting from the aligned policy of round n − 1:

1. samples it and π_ref on **calibration** prompts (disjoint from training and test), scores both and measures the
   achieved gains with simultaneous intervals (`train.evaluate`, the same code as `can evaluate`);
2. stops if `can_jax.refine.stop_rule` holds; else takes the correction step of `can_jax.refine` — the box-
   constrained Newton step on the dual's Hessian, secant-updated from round 2 on — or CAID's fixed step;
3. writes the round-n certificate: the dual on the *original* π_ref samples whose solution is the new λ
   (`bridge.dual.round_certificate`), linked to round n − 1's by hash;
4. relabels those samples under it (`can label`) and runs DPO again (`can train`), continuing from round n − 1's
   policy with π_ref kept as the DPO reference (default) or from π_ref;
5. measures the new policy on the calibration prompts (and, when given, on held-out test prompts).

OUT/round-N/ holds each round's certificate, preferences, DPO run and measurements; a finished file is never
rewritten, so a killed run resumes where it was when run again with the same command. OUT/rounds.md, .json and
.png hold the rounds table and plot. Under `accelerate launch` the sampling, scoring and DPO are spread over the
processes; the main process writes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bridge.owned import same_location, spelled
from bridge.reports import EvaluationReport, RefineRecord, RoundsReport
from bridge.tables import open_scores
from can_jax.errors import CanError
from train.prompts import prompt_key, shown_prompt, training_prompts

STEPS = ("newton", "caid")
STARTS = ("reference", "previous")
RECORD = "refine.json"
# What a run folder's rounds depend on: changing one of these under an existing OUT would mix two chains.
CHAIN_SETTINGS = ("step", "eta", "secant", "start", "k", "max_new_tokens", "seed", "mode", "pairs_per_prompt",
                  "label_seed", "dpo", "reference", "floor", "level", "chat_template", "dtype")  # fmt: skip


@dataclass
class RefineConfig:
    policy: str  # round 0's aligned policy: a `can train` output (carries its certificate)
    scores: str  # the π_ref samples its certificate was solved on (`can collect`'s table; refine reads it once)
    prompts: list  # calibration prompts (texts or conversations), disjoint from training and test
    scorers: list  # NAME=SPEC for the reward and every constraint
    out: str = "can-refine"
    reference: str = "smollm2"  # π_ref
    certificate: str | None = None  # round 0's certificate; default the one the policy carries (checked if both)
    rounds: int = 2  # correction rounds at most
    step: str = "newton"  # newton (the dual's Hessian, then secant) or caid (λ ← [λ − η(a − b)]₊)
    eta: float = 1.0  # caid's step size
    secant: bool = True  # newton: secant updates of the sensitivity from round 2 on
    # Each round's DPO continuing from the previous round's policy (π_ref stays the DPO reference), or from π_ref.
    # Continuing, one round met both margins on the demo's test prompts with seed 0 (12 pairs per prompt, 96
    # calibration prompts; 6 pairs, 48) and seed 1 (12 pairs, 48; with 96 it missed by 0.003); from π_ref the
    # harmlessness gain stalled (hard labels barely change with λ, so a fresh DPO relearns the same tilt).
    # None: previous, or reference for a LoRA run (whose DPO reference is its base model).
    start: str | None = None
    floor: float = 0.02  # the stopping rule's smallest tolerance
    level: float = 0.95  # joint confidence of the m intervals the rule judges with
    k: int = 8  # samples per calibration prompt and policy
    max_new_tokens: int = 48
    gen_batch_size: int = 64
    seed: int = 1  # calibration sampling seed
    test_prompts: list | None = None  # held-out prompts: measured each round, never used to steer
    test_k: int = 8
    test_seed: int = 2
    mode: str = "bt"  # label mode of the relabelled samples (as `can label`)
    pairs_per_prompt: int = 1
    label_seed: int = 0
    dpo: dict = field(default_factory=dict)  # `train.dpo.TrainConfig` fields (epochs, lr, batch_size, train_top, …)
    chat_template: bool = True
    dtype: str = "fp32"
    scorer_options: dict | None = None
    insample: bool = True  # each round's gains on the training samples (a log-prob pass over the table)

    def __post_init__(self):
        if self.start is None:
            self.start = default_start(bool(self.dpo.get("lora")))

    def check(self) -> None:
        if self.step not in STEPS:
            raise CanError(f"--step {self.step!r}: use one of {', '.join(STEPS)}")
        if self.start not in STARTS:
            raise CanError(f"--start {self.start!r}: use one of {', '.join(STARTS)}")
        if self.rounds < 0:
            raise CanError(f"--rounds must be at least 0, got {self.rounds}")
        if not (np.isfinite(self.eta) and self.eta > 0):
            raise CanError(f"--eta must be a positive number, got {self.eta}")
        if not (np.isfinite(self.floor) and self.floor >= 0):
            raise CanError(f"--floor must be a number ≥ 0, got {self.floor}")
        if not 0 < self.level < 1:
            raise CanError(f"--level must be in (0, 1), got {self.level}")
        if len(self.prompts) < 2:
            raise CanError(f"{len(self.prompts)} calibration prompt(s): give at least 2 (the intervals are over "
                           "prompts)")  # fmt: skip
        from bridge.labels import check_label_options

        check_label_options(self.mode, self.pairs_per_prompt)  # the rounds' labelling, before round 0
        self._check_dpo()
        if self.start == "previous" and self.dpo.get("lora"):
            raise CanError("--start previous with LoRA is not supported: a LoRA run's reference is its base model")

    def _check_dpo(self) -> None:
        """The rounds' DPO options, before round 0 is measured and recorded (else a bad value is found minutes later,
        after refine.json holds it)."""
        d = self.dpo
        for key, flag in (("lr", "--lr"), ("epochs", "--epochs")):
            v = d.get(key)
            if v is not None and not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise CanError(f"{flag} must be a positive number, got {v}")
        for key, flag in (("batch_size", "--batch-size"), ("max_length", "--max-length"), ("train_top", "--train-top")):
            v = d.get(key)
            if v is not None and v < 1:
                raise CanError(f"{flag} must be at least 1, got {v}")
        if d.get("precision") not in (None, "auto", "bf16", "fp32"):
            raise CanError(f"--precision {d['precision']!r}: use auto, bf16 or fp32")
        if self.test_prompts is not None and len(self.test_prompts) < 2:
            raise CanError(f"{len(self.test_prompts)} test prompt(s): give at least 2 (the intervals are over prompts)")

    def chain_settings(self) -> dict:
        return {k: copy.deepcopy(getattr(self, k)) for k in CHAIN_SETTINGS}


def default_start(lora: bool) -> str:
    """The rounds' DPO start when none is asked for: continuing from the previous round's policy, except with LoRA
    (an adapter run's DPO reference is its base model, so it can only restart from π_ref)."""
    return "reference" if lora else "previous"


def chain_start(cfg: RefineConfig):
    """(round-0 certificate, policy path): the policy's carried certificate, checked against --certificate, the
    scores table and the reference. Refuses a policy or certificate from another chain, in one line."""
    from bridge.certificate import Certificate, read_beside
    from bridge.tables import scores_sha256

    policy = Path(cfg.policy)
    if not policy.is_dir():
        raise CanError(f"{policy}: not a policy folder (give the aligned policy `can train` wrote, RUN/policy)")
    carried = read_beside(policy)
    given = None if cfg.certificate is None else Certificate.read(cfg.certificate)
    if carried is None and given is None:
        raise CanError(f"{policy} carries no certificate.json (was it trained by `can train`?): give --certificate")
    if carried is not None and given is not None and carried.sha256 != given.sha256:
        raise CanError(f"{policy} was aligned under another certificate than {cfg.certificate} (λ {carried.lam} "
                       f"there, {given.lam} here): refine the policy of that certificate's chain")  # fmt: skip
    cert = carried or given
    if cert.round_index != 0:
        raise CanError(f"{policy} is the policy of correction round {cert.round_index}: give round 0's policy, "
                       "and the same --out to continue a refine run")  # fmt: skip
    if not Path(cfg.scores).is_file():
        raise CanError(f"scores table not found: {cfg.scores}")
    if scores_sha256(cfg.scores) != cert.scores_sha256:
        raise CanError(f"{cfg.scores} is not the scores table the certificate of {policy} was solved on "
                       f"(sha256 {str(cert.scores_sha256)[:12]}…): give that table")  # fmt: skip
    from train.run_record import recorded_policy

    base = recorded_policy(policy.parent)
    if base is not None and not same_location(base, cfg.reference):
        raise CanError(f"{policy} was aligned from {base!r}, not from the reference {cfg.reference!r}: give "
                       f"--reference {base}")  # fmt: skip
    return cert, str(policy)


def check_prompts_apart(cfg: RefineConfig) -> None:
    """Calibration prompts steer λ and test prompts judge the rounds: neither may repeat, share a prompt with the
    other, or be a training prompt of the scores table (gains there read higher than on fresh prompts). Refused in
    one line, before any model work."""

    def clash(a, b, what):
        shared = sorted((set(a) & set(b)) - {None})
        if shared:
            raise CanError(f"{len(shared)} {what} (e.g. {shown_prompt(shared[0])}): {_APART}")

    cal = [prompt_key(p) for p in cfg.prompts]
    test = [prompt_key(p) for p in cfg.test_prompts or []]
    for keys, name in ((cal, "calibration"), (test, "test")):
        seen, repeats = set(), []
        for k in keys:
            if k is not None and k in seen:
                repeats.append(k)
            seen.add(k)
        if repeats:
            raise CanError(f"{len(repeats)} {name} prompt(s) repeat an earlier one (e.g. "
                           f"{shown_prompt(repeats[0])}): the intervals are over distinct prompts; remove the "
                           "repeats")  # fmt: skip
    clash(cal, test, "calibration prompt(s) are also test prompts")
    train = {prompt_key(p) for p in training_prompts(cfg.scores)}
    clash(cal, train, "calibration prompt(s) are training prompts of the scores table")
    clash(test, train, "test prompt(s) are training prompts of the scores table")


_APART = ("calibration prompts steer the rounds and test prompts judge them, so both must be fresh to the policy and "
          "apart from each other; use prompts the policy was not trained on, in one file each")


def prompts_sha256(prompts: list) -> str:
    """The SHA-256 of a prompt list (texts or conversations) in order: which calibration or test prompts a run's
    rounds were measured on."""
    from bridge.certificate import sha256_of  # canonical JSON (sorted keys), for a list as for a body

    return sha256_of(list(prompts))


def _is_record(path: Path) -> bool:
    """Whether `path` is a refine record (a rounds folder from before the marker)."""
    try:
        return RefineRecord.read(path).root_sha256 is not None
    except CanError:
        return False


def _check_record(out: Path, cfg: RefineConfig, cert) -> None:
    """OUT/refine.json: the chain and settings its rounds belong to, the calibration and test prompts by hash. A
    rerun with the same ones resumes (more --rounds continue the run); another chain, other settings or other prompts
    are refused (rounds measured on other prompts would not steer one run)."""
    settings = {**cfg.chain_settings(), "calibration_prompts_sha256": prompts_sha256(cfg.prompts),
                "test_prompts_sha256": prompts_sha256(cfg.test_prompts) if cfg.test_prompts else None}  # fmt: skip
    settings["reference"] = spelled(settings["reference"])  # the same run from another folder resumes
    record = RefineRecord.build(root_sha256=cert.sha256, scores_sha256=cert.scores_sha256, policy=spelled(cfg.policy),
                                settings=settings)  # fmt: skip
    path = out / RECORD
    if path.is_file():
        try:
            old = RefineRecord.read(path)
        except CanError as err:
            raise CanError(f"{err}; use another --out") from None
        if old.root_sha256 != record.root_sha256 or not same_location(old.policy, record.policy):
            raise CanError(f"{out} holds the rounds of another chain (policy {old.policy!r}): use another "
                           "--out")  # fmt: skip
        was, now = old.settings, record.settings
        if "calibration_prompts_sha256" not in was:
            raise CanError(f"{out} holds rounds recorded before refine kept its prompts' hashes, so a resume cannot "
                           "check it measures on the same prompts: use another --out")  # fmt: skip
        def says(k):
            if k.endswith("_prompts_sha256"):  # the prompts by hash: a short one is enough to tell them apart
                short = [v[:12] if isinstance(v, str) else v for v in (now.get(k), was.get(k))]
                return f"other {k.split('_')[0]} prompts (sha256 {short[0]} here, {short[1]} there)"
            return f"{k} {now.get(k)!r} here, {was.get(k)!r} there"

        diff = [says(k) for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)
                and not (k == "reference" and same_location(was.get(k), now.get(k)))]  # fmt: skip
        if diff:
            raise CanError(f"{out} holds rounds made with other settings ({'; '.join(diff)}): rerun with those, or "
                           "use another --out")  # fmt: skip
        return
    record.write(path)


def gains_of(report: EvaluationReport, names: list[str], level: float) -> dict:
    """From an evaluation report: the constraints' achieved gains a [m], standard errors [m] and half-widths of
    their simultaneous intervals at joint `level` (Student t over prompts, Bonferroni over the m constraints)."""
    from scipy.stats import t

    from can_jax.refine import simultaneous_level

    a = np.array([report.row(n).achieved_gain for n in names], float)
    se = np.array([report.row(n).standard_error for n in names], float)
    q = float(t.ppf(0.5 + simultaneous_level(len(names), level) / 2, report.prompts - 1))
    return {"gain": a, "se": se, "half_width": q * se}


def next_lambda(cfg: RefineConfig, history: list[tuple[np.ndarray, np.ndarray]], margins: np.ndarray,
                hess0: np.ndarray) -> np.ndarray:  # fmt: skip
    """λ for the next round from the measured history [(λ_t, a_t)] (round 0 first): replays the steps, so a resumed
    run takes exactly the step it would have taken."""
    import jax.numpy as jnp

    from can_jax.refine import caid_step, refine_init, refine_step

    if cfg.step == "caid":
        lam, a = history[-1]
        return np.asarray(caid_step(jnp.asarray(lam), jnp.asarray(a), jnp.asarray(margins), cfg.eta), float)
    state = refine_init(jnp.asarray(history[0][0]), jnp.asarray(hess0))
    b = jnp.asarray(margins)
    for _, a in history:
        state = refine_step(state, jnp.asarray(a), b, secant=cfg.secant)
    return np.asarray(state.lam, float)


def refine(cfg: RefineConfig, say=print, reference_memo: dict | None = None) -> RoundsReport:
    """Runs (or resumes) the correction rounds in cfg.out; returns the rounds report (OUT/rounds.json)."""
    from can_jax.refine import stop_rule
    from train import dist
    from train.evaluate import check_scorer_specs, check_scorers
    from train.scorers import parse_scorer

    cfg.check()
    if not Path(cfg.scores).is_file():
        raise CanError(f"scores table not found: {cfg.scores}")
    # The table is read once, hashed as it is read, and every stage of every round takes it from memory.
    cfg = replace(cfg, scores=open_scores(cfg.scores))
    cert0, policy0 = chain_start(cfg)
    check_prompts_apart(cfg)
    names = cert0.names
    check_scorers(cert0, [parse_scorer(s)[0] for s in cfg.scorers])
    check_scorer_specs(cert0, [parse_scorer(s) for s in cfg.scorers])
    st = dist.state()
    out = Path(cfg.out)
    entries = [RECORD, "rounds.json", "rounds.md", "rounds.png", *(f"round-{n}" for n in range(cfg.rounds + 1))]
    dist.claim(st, out, entries, legacy=lambda f: _is_record(f / RECORD))
    if st.is_main_process:
        _check_record(out, cfg, cert0)
    st.wait_for_everyone()
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
        g = gains_of(cal, names, cfg.level)
        lam = np.array([cert.lam[x] for x in names], float)
        stop, tol = stop_rule(g["gain"], g["half_width"], margins, lam > 0, cfg.floor)
        rows.append(_row(n, cert, cal, test, insample, g, tol, stop, names, time.perf_counter() - t0))
        rows[-1]["seconds_aligning"] = None if n == 0 else round(align_s, 1)
        history.append((lam, g["gain"]))
        if st.is_main_process:
            write_rounds(out, _report(rows, None, names, margins, out, cfg), cfg)
        say(_say_round(rows[-1], names))
        if stop:
            stopped = True
            say(f"round {n}: every constraint is within its tolerance of its margin: stopping")
            break
        if n >= cfg.rounds:
            break
        n += 1
        t0 = time.perf_counter()
        if hess0 is None:
            hess0 = _hessian(cfg.scores, cert0)
        lam_next = next_lambda(cfg, history, margins, hess0)
        cert = _round_certificate(cfg, cert, lam_next, n, out / f"round-{n}", history[-1][1], g["half_width"])
        say(f"round {n}: λ {dict(zip(names, np.round(lam_next, 4).tolist(), strict=True))} ({cfg.step} step); "
            f"predicted gains on the samples {cert.predicted_gains}")  # fmt: skip
        policy = _align(cfg, cert, policy, out / f"round-{n}", say)
        align_s = time.perf_counter() - t0
        say(f"round {n}: relabelled and aligned in {align_s:.0f} s → {policy}")
    report = _report(rows, stopped, names, margins, out, cfg)
    if st.is_main_process:
        write_rounds(out, report, cfg)
    st.wait_for_everyone()
    return report


def _hessian(scores, cert) -> np.ndarray:
    """The dual's Hessian at round 0's λ on its table: the first sensitivity ∂p/∂λ."""
    import jax.numpy as jnp

    from bridge.dual import loaded_for
    from can_jax.refine import sensitivity

    loaded = loaded_for(scores, cert, dtype=jnp.float64)
    lam = jnp.asarray([cert.lam[n] for n in cert.names], jnp.float64)
    return np.asarray(sensitivity(lam, loaded.scores, cert.beta)[1], float)


def _measure(cfg, policy, cert, prompts, k, seed, folder: Path, memo) -> EvaluationReport:
    """A policy's achieved gains on prompts (the `can evaluate` report), read back if that round already has it."""
    from train.evaluate import evaluate

    done = folder / "evaluation.json"
    if done.is_file():
        return EvaluationReport.read(done)
    return evaluate(policy, cfg.reference, list(prompts), list(cfg.scorers), cert, folder, k=k,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=seed,
                    chat_template=cfg.chat_template, scorer_options=cfg.scorer_options, dtype=cfg.dtype,
                    reference_memo=memo)  # fmt: skip


def _insample(cfg, policy, folder: Path) -> dict:
    from bridge.files import atomic_write_text
    from train import dist
    from train.evaluate import insample_gains
    from train.scorers import parse_scorer

    path = folder / "insample.json"
    if path.is_file():
        return json.loads(path.read_text())
    gains = insample_gains(policy, cfg.scores, [parse_scorer(s)[0] for s in cfg.scorers], cfg.gen_batch_size,
                           cfg.dpo.get("max_length"), cfg.dtype)  # fmt: skip
    if dist.state().is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(gains, indent=2) + "\n")
    return gains


def _round_certificate(cfg, parent, lam, n: int, folder: Path, achieved, half_width):
    """Round n's certificate, written once (main process); a resumed run reads it back and checks its parent."""
    from bridge.certificate import Certificate
    from bridge.dual import round_certificate
    from train import dist

    path = folder / "certificate.json"
    st = dist.state()
    if st.is_main_process and not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        names = parent.names
        record = {
            "step": cfg.step,
            **({"eta": cfg.eta} if cfg.step == "caid" else {}),
            "measured_gains": dict(zip(names, np.asarray(achieved, float).tolist(), strict=True)),
            "measured_half_width": dict(zip(names, np.asarray(half_width, float).tolist(), strict=True)),
        }
        round_certificate(cfg.scores, parent, lam, n, **record).write(path)
    st.wait_for_everyone()
    cert = Certificate.read(path)
    if cert.parent_sha256 != parent.sha256 or cert.round_index != n:
        raise CanError(f"{path} is not round {n} of this chain (its parent is another certificate): use another "
                       "--out")  # fmt: skip
    return cert


def _align(cfg, cert, previous: str, folder: Path, say) -> str:
    """Relabels the π_ref samples under round n's certificate and runs DPO (resuming its checkpoints)."""
    from train import dist
    from train.dpo import TrainConfig
    from train.dpo import run as train
    from train.label import LabelConfig
    from train.label import run as run_label

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
    kw = dict(cfg.dpo)
    return str(train(TrainConfig(preferences=str(prefs), policy=start, out=str(folder / "run"), resume=True,
                                 overwrite=True, reference=cfg.reference if continuing else None, **kw)))


def _row(n, cert, cal: EvaluationReport, test: EvaluationReport | None, insample, g, tol, stop, names,
         seconds) -> dict:  # fmt: skip
    reward = cert.reward
    row = {"round": n, "certificate_sha256": cert.sha256, "lambda": cert.lam, "stop": bool(stop),
           "seconds_measuring": round(seconds, 1), "gains": {}}  # fmt: skip
    for j, name in enumerate(names):
        row["gains"][name] = {
            "predicted": cert.predicted_gains[name],
            "insample": None if insample is None else _signed(insample[name], cert, name),
            "calibration": cal.row(name).achieved_gain, "calibration_half_width": float(g["half_width"][j]),
            "tolerance": float(tol[j]),
            "held_out": test.row(name).achieved_gain if test else None,
            "held_out_ci95": list(test.row(name).ci95) if test else None,
        }  # fmt: skip
    row["reward"] = {"predicted": cert.predicted_reward_gain, "calibration": cal.row(reward).achieved_gain,
                     "held_out": test.row(reward).achieved_gain if test else None,
                     "held_out_ci95": list(test.row(reward).ci95) if test else None}  # fmt: skip
    row["kl"] = ((test or cal).text or {}).get("kl")
    return row


def _signed(value, cert, name):
    from bridge.tables import sign_of

    return sign_of(dict(zip(cert.names, cert.kinds, strict=True))[name]) * value


def _say_round(row, names) -> str:
    parts = []
    for name in names:
        c = row["gains"][name]
        held = "" if c["held_out"] is None else f", held out {c['held_out']:+.3f}"
        parts.append(f"{name} {c['calibration']:+.3f} ± {c['calibration_half_width']:.3f}{held}")
    return f"round {row['round']}: calibration gains " + "; ".join(parts)


def _report(rows: list, stopped: bool | None, names: list, margins, out: Path, cfg: RefineConfig) -> RoundsReport:
    """The rounds report (OUT/rounds.json; `stopped` None while the run is under way)."""
    return RoundsReport.build(rounds=rows, stopped=stopped, names=names, margins=list(margins), out=str(out),
                              settings=json.loads(json.dumps(cfg.chain_settings(), default=str)))  # fmt: skip


def write_rounds(out: Path, report: RoundsReport, cfg: RefineConfig) -> None:
    """OUT/rounds.json, rounds.md and rounds.png (atomic writes)."""
    from bridge.files import atomic_write_text

    report.write(out / "rounds.json")
    atomic_write_text(out / "rounds.md", rounds_markdown(report, cfg))
    plot_rounds(report, out / "rounds.png")


def _f(x, spec="+.3f"):
    return "—" if x is None else format(x, spec)


def rounds_markdown(report: RoundsReport, cfg: RefineConfig) -> str:
    names, margins = report.names, report.margins
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
    for row in report.rounds:
        for j, name in enumerate(names):
            c = row["gains"][name]
            held = "—" if c["held_out"] is None else (f"{c['held_out']:+.3f} [{c['held_out_ci95'][0]:+.3f}, "
                                                      f"{c['held_out_ci95'][1]:+.3f}]")  # fmt: skip
            lines.append(f"| {row['round']} | {name} | {margins[j]:+.3f} | {row['lambda'][name]:.4g} | "
                         f"{_f(c['predicted'])} | {_f(c['insample'])} | {c['calibration']:+.3f} ± "
                         f"{c['calibration_half_width']:.3f} | {held} |")  # fmt: skip
    lines += ["", "| round | reward: predicted | reward held out [95%] | KL (nats) | stop |", "|---|---|---|---|---|"]
    for row in report.rounds:
        r = row["reward"]
        held = (
            "—"
            if r["held_out"] is None
            else f"{r['held_out']:+.3f} [{r['held_out_ci95'][0]:+.3f}, {r['held_out_ci95'][1]:+.3f}]"
        )
        lines.append(f"| {row['round']} | {_f(r['predicted'])} | {held} | {_f(row['kl'], '.2f')} | "
                     f"{'yes' if row['stop'] else 'no'} |")  # fmt: skip
    lines += ["", "![rounds](rounds.png)", ""]
    return "\n".join(lines)


def plot_rounds(report: RoundsReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bridge.files import write_figure

    names, rows, margins = report.names, report.rounds, report.margins
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
    fig.tight_layout()
    write_figure(path, fig)
    plt.close(fig)
