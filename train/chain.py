"""A correction chain's settings (`RefineConfig`) and the guards that keep one run folder one chain: round 0's
certificate and policy checked against the scores table and the reference, calibration and test prompts apart from
each other and from training, and OUT/refine.json (`bridge.reports.RefineRecord`) refusing another chain or other
settings on a resume."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bridge.files import same_location, spelled
from bridge.reports import RefineRecord
from bridge.tables import load_for, open_scores
from can_jax.errors import CanError, at_least_one
from train.prompts import check_prompts_apart
from train.scorers import ScorerOptions
from train.settings import DPOSettings

STEPS = ("newton", "caid")
STARTS = ("reference", "previous")
RECORD = "refine.json"
# What a run folder's rounds depend on: changing one of these under an existing OUT would mix two chains.
CHAIN_SETTINGS = ("step", "eta", "secant", "start", "k", "max_new_tokens", "seed", "mode", "pairs_per_prompt",
                  "label_seed", "dpo", "reference", "floor", "level", "chat_template", "dtype", "test_k",
                  "test_seed")  # fmt: skip
# What a record written before a setting was recorded implies for it (the test prompts were measured with K = k and
# seed 2 then).
IMPLIED = {"test_k": lambda was: was.get("k"), "test_seed": lambda was: 2}


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
    # Each round's DPO continuing from the previous round's policy (π_ref stays the DPO reference), or from π_ref:
    # hard labels barely change with λ, so a fresh DPO from π_ref relearns the same tilt and stalls (docs/RESULTS.md,
    # "The rounds' DPO start"). None: previous, or reference for a LoRA run (whose DPO reference is its base model).
    start: str | None = None
    floor: float = 0.02  # the stopping rule's smallest tolerance
    level: float = 0.95  # joint confidence of the m intervals the rule judges with
    k: int = 8  # samples per calibration prompt and policy
    max_new_tokens: int = 48
    gen_batch_size: int = 64
    seed: int = 1  # calibration sampling seed
    test_prompts: list | None = None  # held-out prompts: measured each round, never used to steer
    test_k: int | None = None  # samples per test prompt and policy (None: as k)
    test_seed: int = 2
    mode: str = "bt"  # label mode of the relabelled samples (as `can label`)
    pairs_per_prompt: int = 1
    label_seed: int = 0
    dpo: DPOSettings = field(default_factory=DPOSettings)  # each round's DPO
    chat_template: bool = True
    dtype: str = "fp32"
    scorer_options: ScorerOptions = field(default_factory=ScorerOptions)
    insample: bool = True  # each round's gains on the training samples (a log-prob pass over the table)

    def __post_init__(self):
        if self.test_k is None:
            self.test_k = self.k
        if self.start is None:
            # Continuing from the previous round's policy, except with LoRA (an adapter run's DPO reference is its
            # base model, so it can only restart from π_ref).
            self.start = "reference" if self.dpo.lora else "previous"

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
        at_least_one(("--k", self.k), ("--test-k", self.test_k), ("--max-new-tokens", self.max_new_tokens),
                     ("--gen-batch-size", self.gen_batch_size))  # fmt: skip
        if self.test_prompts is not None and len(self.test_prompts) < 2:
            raise CanError(f"{len(self.test_prompts)} test prompt(s): give at least 2 (the intervals are over prompts)")
        if self.start == "previous" and self.dpo.lora:
            raise CanError("--start previous with LoRA is not supported: a LoRA run's reference is its base model")
        from bridge.labels import check_label_options

        check_label_options(self.mode, self.pairs_per_prompt)  # the rounds' labelling, before round 0

    def chain_settings(self) -> dict:
        settings = {k: copy.deepcopy(getattr(self, k)) for k in CHAIN_SETTINGS}
        # The DPO options as refine.json has always recorded them: the ones set (unset and off ones left out).
        settings["dpo"] = {k: v for k, v in dataclasses.asdict(self.dpo).items() if v is not None and v is not False}
        return settings


def chain_start(cfg: RefineConfig):
    """(round-0 certificate, policy path, the scores table opened, the table as its certificate reads it): the
    policy's carried certificate, checked against --certificate, the scores table and the reference. Refuses a policy
    or certificate from another chain, in one line."""
    from bridge.certificate import Certificate, read_beside

    cfg.check()
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
    scores = open_scores(cfg.scores)  # read once: hashed as it is read, every round takes it from memory
    if scores.sha256 != cert.scores_sha256:
        raise CanError(f"{cfg.scores} is not the scores table the certificate of {policy} was solved on "
                       f"(sha256 {str(cert.scores_sha256)[:12]}…): give that table")  # fmt: skip
    loaded = load_for(scores, cert)
    from train.run_record import recorded_policy

    base = recorded_policy(policy.parent)
    if base is not None and not same_location(base, cfg.reference):
        raise CanError(f"{policy} was aligned from {base!r}, not from the reference {cfg.reference!r}: give "
                       f"--reference {base}")  # fmt: skip
    return cert, str(policy), scores, loaded


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


def _set_options(dpo: dict) -> dict:
    """The DPO options of a record that differ from `DPOSettings`' defaults."""
    defaults = dataclasses.asdict(DPOSettings())
    return {k: v for k, v in dpo.items() if defaults.get(k, object()) != v}


def check_record(out: Path, cfg: RefineConfig, cert) -> None:
    """OUT/refine.json: the chain and settings its rounds belong to, the calibration and test prompts by hash. A
    rerun with the same ones resumes (more --rounds continue the run); another chain, other settings or other prompts
    are refused (rounds measured on other prompts would not steer one run)."""
    settings = {**cfg.chain_settings(), "calibration_prompts_sha256": prompts_sha256(cfg.prompts),
                "test_prompts_sha256": prompts_sha256(cfg.test_prompts) if cfg.test_prompts else None}  # fmt: skip
    # Paths as resolved: the same run from another folder resumes.
    policy, settings["reference"] = spelled(cfg.policy), spelled(settings["reference"])
    record = RefineRecord.build(root_sha256=cert.sha256, scores_sha256=cert.scores_sha256, policy=policy,
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
        was, now = dict(old.settings), dict(record.settings)
        if "calibration_prompts_sha256" not in was:
            raise CanError(f"{out} holds rounds recorded before refine kept its prompts' hashes, so a resume cannot "
                           "check it measures on the same prompts: use another --out")  # fmt: skip
        was.update({k: implied(was) for k, implied in IMPLIED.items() if k not in was})
        # The DPO options compared as set: an option at its default recorded or not is the same run.
        was["dpo"], now["dpo"] = _set_options(was.get("dpo") or {}), _set_options(now.get("dpo") or {})
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



def open_chain(cfg: RefineConfig):
    """Checks a refine run before any model work and claims its folder: returns (cfg with its scores table opened,
    round 0's certificate, round 0's policy, the table as that certificate reads it). The table is read once,
    hashed as it is read, and every stage of every round takes it from memory."""
    from train import dist
    from train.scorers import check_scorer_specs, check_scorers, parse_scorer

    cert0, policy0, scores, loaded = chain_start(cfg)
    cfg = replace(cfg, scores=scores)
    check_prompts_apart(cfg.prompts, cfg.test_prompts, scores.table)
    parsed = [parse_scorer(s) for s in cfg.scorers]
    check_scorers(cert0, [p[0] for p in parsed])
    check_scorer_specs(cert0, parsed)
    st = dist.state()
    out = Path(cfg.out)
    entries = [RECORD, "rounds.json", "rounds.md", "rounds.png", *(f"round-{n}" for n in range(cfg.rounds + 1))]
    dist.claim(st, out, entries, legacy=lambda f: _is_record(f / RECORD))
    if st.is_main_process:
        check_record(out, cfg, cert0)
    st.wait_for_everyone()
    return cfg, cert0, policy0, loaded
