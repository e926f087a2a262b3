"""`can evaluate`: achieved vs predicted gains (DESIGN §2, §5).

Samples from the aligned and the reference policy on held-out prompts, scores both with the same scorers, and
reports for the reward and each constraint the achieved gain E_aligned − E_ref with a 95% interval from the
per-prompt paired differences (Student t with n − 1 degrees of freedom: 16 prompts use t = 2.13, not z = 1.96),
beside the gain the dual certificate predicted for π_λ*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge.files import atomic_write_text, pyplot, sha256_file, write_figure
from bridge.reports import EvaluationReport, GainRow, cell
from can_jax.errors import CanError
from train.scorers import ScorerOptions

PROMPTS_PER_UNIT = 16  # prompts per unit of evaluation work; unit u samples with seed + u (`train.dist`)


def _policy_scores(spec: str, prompts: list, scorers: list, cfg: EvaluateConfig):
    """Per-prompt mean scores of cfg.k samples of a policy, and the samples. Units of prompts are spread over the
    processes of `accelerate launch` (seeds per unit: the same numbers for any number of processes)."""
    from train import dist
    from train.models import load_policy
    from train.prompts import check_context, sample
    from train.tokens import as_prompts, is_conversation

    k, max_new_tokens, chat_template = cfg.k, cfg.max_new_tokens, cfg.chat_template
    st = dist.state()
    model, tok = load_policy(spec, dist.device(st), cfg.dtype)
    model.eval()
    conv = any(is_conversation(p) for p in prompts)
    check_context(model, tok, as_prompts(tok, prompts, chat_template), max_new_tokens, "the held-out prompts", spec)

    def unit(u):
        chunk = prompts[u * PROMPTS_PER_UNIT : (u + 1) * PROMPTS_PER_UNIT]
        # The same tokenisation path and exact sampling as `can collect` (train.tokens, train.sampling).
        drawn = sample(model, tok, as_prompts(tok, chunk, chat_template), k, max_new_tokens, cfg.batch_size,
                       cfg.seed + u)  # fmt: skip
        instr = [p for p in (as_prompts(tok, chunk, True) if conv else chunk) for _ in range(k)]
        scores = {sc.name: np.asarray(sc(instr, drawn["response"])).reshape(len(chunk), k) for sc in scorers}
        ids = list(zip(drawn["prompt_ids"], drawn["response_ids"], strict=True))
        return scores, drawn["response"], ids, drawn.get("logp")

    parts = dist.map_units(st, -(-len(prompts) // PROMPTS_PER_UNIT), unit)
    per_prompt = {sc.name: np.concatenate([p[0][sc.name] for p in parts]).mean(axis=1) for sc in scorers}
    resp = [r for p in parts for r in p[1]]
    ids = [i for p in parts for i in p[2]]
    logp = None if any(p[3] is None for p in parts) else np.array([lp for p in parts for lp in p[3]], float)
    return per_prompt, [resp[j * k : (j + 1) * k] for j in range(len(prompts))], ids, logp


def distinct_2(texts: list[str]) -> float:
    """Distinct-2: unique word bigrams over all bigrams of the samples (1 = no bigram repeats; degenerate,
    repetitive text drives it down)."""
    grams = [tuple(w[i : i + 2]) for w in (t.lower().split() for t in texts) for i in range(len(w) - 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def policy_logps(spec, prompts: list, responses: list, ids: list | None, batch_size: int, max_length: int | None = None,
                 dtype: str = "fp32") -> np.ndarray:  # fmt: skip
    """[n] summed log π(response | prompt) under policy `spec`, computed the DPO way on the sampled (prompt ids,
    response ids) when `ids` are given, spread over the processes in fixed units of rows."""
    import torch

    from train import dist
    from train.logps import sequence_logps
    from train.logratios import ROWS_PER_UNIT
    from train.models import load_policy

    st = dist.state()
    model, tok = load_policy(spec, dist.device(st), dtype)

    def block(u):
        sl = slice(u * ROWS_PER_UNIT, (u + 1) * ROWS_PER_UNIT)
        return sequence_logps(model.eval(), tok, prompts[sl], responses[sl], max_length=max_length,
                              batch_size=batch_size, ids=None if ids is None else ids[sl])  # fmt: skip

    return torch.cat(dist.map_units(st, -(-len(prompts) // ROWS_PER_UNIT), block)).double().numpy()


def sample_logps(spec, ids: list, batch_size: int, dtype: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """[n] summed log π(response | prompt) of sampled (prompt_ids, response_ids) under policy `spec`, and [n]
    response lengths in tokens."""
    none = [None] * len(ids)
    return policy_logps(spec, none, none, ids, batch_size, dtype=dtype), np.array([len(r) for _, r in ids], float)


def text_health(aligned: str, reference: str, samples_a, samples_r, ids_a, ids_r, batch_size, dtype, logp_a=None,
                logp_r=None) -> dict:
    """The degeneration check: distinct-2 of each policy's samples and their mean log π_ref per token
    (a policy that games lexical scorers with broken text shows lower values than the reference's own samples),
    and the KL(π_aligned ‖ π_ref) estimate E_aligned[log π_aligned − log π_ref] per response, in nats."""
    # The sampler's own log-probs (`logp_a`, `logp_r`: log π of each sample's ids from the logits it was drawn
    # from) spare two of the three passes; log π_ref of the aligned samples is always computed.
    if logp_r is None:
        ref, n = sample_logps(reference, ids_a + ids_r, batch_size, dtype)  # one load of the reference for both
        (ref_a, ref_r), (n_a, n_r) = np.split(ref, [len(ids_a)]), np.split(n, [len(ids_a)])
    else:
        (ref_a, n_a), ref_r = sample_logps(reference, ids_a, batch_size, dtype), np.asarray(logp_r, float)
        n_r = np.array([len(r) for _, r in ids_r], float)
    own_a = np.asarray(logp_a, float) if logp_a is not None else sample_logps(aligned, ids_a, batch_size, dtype)[0]
    per_tok = lambda lp, n: float(lp.sum() / max(n.sum(), 1))  # noqa: E731
    return {
        "distinct_2": {"aligned": distinct_2([r for s in samples_a for r in s]),
                       "reference": distinct_2([r for s in samples_r for r in s])},
        "logp_ref_per_token": {"aligned": per_tok(ref_a, n_a), "reference": per_tok(ref_r, n_r)},
        "mean_tokens": {"aligned": float(n_a.mean()), "reference": float(n_r.mean())},
        "kl": float(np.mean(own_a - ref_a)),
    }  # fmt: skip


# What an evaluation writes into its folder (`timing.json`: the demo's stage times).
EVALUATION_ENTRIES = ("evaluation.json", "evaluation.md", "evaluation.png", "timing.json")


def _is_report(path: Path) -> bool:
    """Whether `path` is an evaluation report `can evaluate` wrote (a folder from before the marker)."""
    try:
        EvaluationReport.read(path)
    except CanError:
        return False
    return True


@dataclass(frozen=True)
class EvaluateConfig:
    """One measurement of achieved gains (`can evaluate`, the demos' last stage, each refine round): the two policies,
    the scorers (`NAME=SPEC`, the certificate's reward and constraints) and how they are sampled."""

    aligned: str
    scorers: tuple[str, ...]  # NAME=SPEC: the certificate's reward and constraints (and any extra)
    reference: str = "smollm2"  # π_ref
    out: str = "can-eval"
    k: int = 4  # samples per prompt and policy
    max_new_tokens: int = 48
    batch_size: int = 64
    seed: int = 1
    chat_template: bool = True
    scorer_options: ScorerOptions = field(default_factory=ScorerOptions)
    dtype: str = "fp32"
    # π_ref's samples and scores on these prompts, kept on disk under the hash of everything that makes them and
    # reused by a later run (a demo rerun, every refine round); CAN_NO_CACHE=1 turns it off too.
    reuse_reference: bool = True


# What a reference-sample file holds; another value is never read (the samples are made again).
REFERENCE_FORMAT = 1


def reference_key(cfg: EvaluateConfig, prompts: list, scorers: list, device: str | None) -> str:
    """SHA-256 of what π_ref's samples and scores on `prompts` depend on: the reference model's files (by content up
    to 16 MB, by size and modification time above: weights rewritten by another run are another model), the prompts,
    each scorer's fingerprint, the sampling settings, the device, the torch and transformers versions and the
    sampling code (its functions' source: an edit of it invalidates every kept file)."""
    import hashlib
    import inspect
    import json

    import torch
    import transformers

    from train import prompts as tp
    from train import sampling, tokens
    from train.models import resolve_policy

    folder = Path(resolve_policy(cfg.reference))
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        files[str(f.relative_to(folder))] = sha256_file(f) if st.st_size <= 16 << 20 else [st.st_size, st.st_mtime_ns]
    code = [inspect.getsource(x) for x in (sampling, tokens, tp.sample, tp.check_context, _policy_scores)]
    parts = {"format": REFERENCE_FORMAT, "model": files, "prompts": [str(p) for p in prompts],
             "scorers": {sc.name: sc.fingerprint() for sc in scorers}, "k": cfg.k,
             "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "seed": cfg.seed,
             "chat_template": cfg.chat_template, "dtype": cfg.dtype, "unit": PROMPTS_PER_UNIT,
             "device": device or "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
             "code": hashlib.sha256("\0".join(code).encode()).hexdigest()}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _read_reference(path: Path):
    """(per-prompt scores, samples, ids, log-probs) from a reference-sample file, or None (absent, unreadable, another
    format: the samples are made again)."""
    import json

    try:
        d = json.loads(path.read_text())
        if d.get("format") != REFERENCE_FORMAT:
            return None
        base = {name: np.asarray(v, float) for name, v in d["scores"].items()}
        ids = [(list(p), list(r)) for p, r in d["ids"]]
        return base, d["samples"], ids, None if d["logp"] is None else np.asarray(d["logp"], float)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_reference(path: Path, got) -> None:
    import json
    import warnings

    base, samples, ids, logp = got
    body = {"format": REFERENCE_FORMAT, "scores": {k: v.tolist() for k, v in base.items()}, "samples": samples,
            "ids": [[list(p), list(r)] for p, r in ids], "logp": None if logp is None else logp.tolist()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(body))
    except OSError as err:  # a cache that cannot be written costs the next run its reuse, not this run its result
        warnings.warn(f"could not keep the reference samples in {path.parent} ({err})", stacklevel=2)


def reference_scores(cfg: EvaluateConfig, prompts: list, scorers: list, memo: dict | None = None):
    """π_ref's (per-prompt scores, samples, ids, log-probs) on `prompts`: from `memo` (this process's earlier calls),
    else from the file an earlier run kept for the same inputs (`reference_key`), else sampled and kept."""
    import os
    import sys

    from train import dist
    from train.models import cache_dir

    st = dist.state()
    key = reference_key(cfg, prompts, scorers, dist.device(st))
    if memo is not None and key in memo:
        return memo[key]
    path = cache_dir() / "reference-samples" / f"{key}.json"
    keep = cfg.reuse_reference and os.environ.get("CAN_NO_CACHE", "") in ("", "0")
    got = dist.shared(st, lambda: _read_reference(path)) if keep else None
    if got is not None and st.is_main_process:
        print(f"reference samples and scores reused from {path} (same reference, prompts, sampling and scorers)",
              file=sys.stderr)  # fmt: skip
    if got is None:
        got = _policy_scores(cfg.reference, prompts, scorers, cfg)
        if keep and st.is_main_process:
            _write_reference(path, got)
    if memo is not None:
        memo[key] = got
    return got


def run(cfg: EvaluateConfig, cert, prompts: list, insample: dict | None = None,
        reference_memo: dict | None = None) -> EvaluationReport:  # fmt: skip
    """Measures cfg.aligned against cfg.reference on held-out `prompts` under `cert` (a `Certificate`); writes
    OUT/evaluation.json, .md and .png and returns the report. `insample` (from `insample_gains`) adds the aligned
    policy's gains on the training samples beside the held-out ones. `reference_memo`: a dict that keeps the reference
    policy's samples and scores between calls of one process (a study evaluating several aligned policies on the same
    prompts samples the reference once)."""
    from train import dist
    from train.prompts import check_sampling
    from train.scorers import check_scorers, make_scorer, parse_scorer

    k, aligned, reference, scorer_specs = cfg.k, cfg.aligned, cfg.reference, list(cfg.scorers)
    check_sampling(k, cfg.max_new_tokens, cfg.batch_size)
    if len(prompts) < 2:
        raise CanError(f"{len(prompts)} held-out prompt: give at least 2 (the interval of the gains is over prompts)")
    check_scorers(cert, [parse_scorer(s)[0] for s in scorer_specs])
    st = dist.state()
    out = Path(cfg.out)
    # Before any sampling: an output folder that cannot be written, or files there `can` did not make, are refused.
    dist.claim(st, out, list(EVALUATION_ENTRIES), legacy=lambda f: _is_report(f / "evaluation.json"))
    scorers = [make_scorer(*parse_scorer(s), **cfg.scorer_options.kwargs(), device=dist.device(st))
               for s in scorer_specs]  # fmt: skip
    ours, samples_a, ids_a, logp_a = _policy_scores(aligned, prompts, scorers, cfg)
    base, samples_r, ids_r, logp_r = reference_scores(cfg, prompts, scorers, reference_memo)
    health = text_health(aligned, reference, samples_a, samples_r, ids_a, ids_r, cfg.batch_size, cfg.dtype, logp_a,
                         logp_r)  # fmt: skip
    same = [a == r for a, r in zip(ids_a, ids_r, strict=True)]
    note = None
    if all(same):
        note = ("the aligned policy drew exactly the reference's samples on every prompt (the same seeds): training "
                "did not move it measurably, so every gain is 0. Check the run's loss and learning rate (a LoRA "
                "adapter needs a larger one than full fine-tuning) and that it trained on this policy.")
    from bridge.tables import sign_of

    reward_col = cert.reward
    kinds = dict(zip(cert.names, cert.kinds, strict=True))
    gains = cert.predicted_gains
    rows = []
    for sc in scorers:
        diff = ours[sc.name] - base[sc.name]  # per prompt, in the column's own direction
        sign = sign_of(kinds.get(sc.name, "utility"))  # report constraints as utility gains, like the dual
        gain, lo, hi = paired_interval(sign * diff)
        if sc.name == reward_col:
            predicted, role = cert.predicted_reward_gain, "reward"
        elif sc.name in kinds:
            predicted, role = gains[sc.name], f"constraint ({kinds[sc.name]})"
        else:
            predicted, role = None, "extra"
        margin = cert.margins.get(sc.name)
        d = sign * diff
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        rows.append(GainRow(name=sc.name, achieved_gain=float(gain), ci95=(lo, hi), role=role, predicted_gain=predicted,
                            standard_error=se, margin=margin, reference_mean=float(sign * base[sc.name].mean()),
                            insample_gain=None if insample is None else sign * insample[sc.name]))  # fmt: skip
    report = EvaluationReport.build(
        aligned=aligned, reference=reference, prompts=len(prompts), samples_per_prompt=k, beta=cert.beta,
        lam=cert.lam, rows=rows, text=health, identical_samples=float(np.mean(same)), note=note,
        examples=[{"prompt": p, "reference": r[0], "aligned": a[0]}
                  for p, r, a in list(zip(prompts, samples_r, samples_a))[:5]],
    )  # fmt: skip
    if st.is_main_process:  # one writer
        report.write(out / "evaluation.json")
        atomic_write_text(out / "evaluation.md", markdown(report))
        plot(report.rows, out / "evaluation.png")
    st.wait_for_everyone()
    return report


def check_policy_folder(aligned: str) -> None:
    """Refuses a `can train` run folder given where its policy belongs: the model is in RUN/policy, and RUN itself
    holds only checkpoints and records (loading it fails far from the reason)."""
    folder = Path(aligned)
    is_model = any((folder / f).is_file() for f in ("config.json", "adapter_config.json"))
    if (folder / "policy").is_dir() and not is_model:
        raise CanError(f"{aligned} is a run folder: evaluate {folder / 'policy'}")


def check_held_out(prompts: list, train_scores) -> None:
    """Refuses held-out prompts that are training prompts of the scores table the certificate was solved on: DPO
    saw them, so their gains read higher than on fresh prompts. The prompts are compared as `can refine` compares
    them (`train.prompts.prompt_key`: text as a one-turn conversation, whitespace-normalised)."""
    from train.prompts import prompt_key, shown_prompt, training_prompts

    train = {prompt_key(p) for p in training_prompts(train_scores)} - {None}
    shared = [key for key in dict.fromkeys(map(prompt_key, prompts)) if key in train]
    if shared:
        raise CanError(f"{len(shared)} of the {len(prompts)} held-out prompts are training prompts of "
                       f"--train-scores {train_scores} (e.g. {shown_prompt(shared[0])}): held-out gains must come from "
                       "prompts DPO did not see; give fresh prompts, or --allow-training-prompts to measure on these "
                       "anyway")  # fmt: skip


def paired_interval(diff, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lower, upper): the mean of per-prompt paired differences and its Student-t interval with n − 1
    degrees of freedom (n prompts are few: the normal quantile would be too narrow). NaN bounds below 2 prompts."""
    from scipy.stats import t

    diff = np.asarray(diff, float)
    mean = float(diff.mean()) if diff.size else float("nan")
    if diff.size < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, diff.size - 1)) * float(diff.std(ddof=1)) / np.sqrt(diff.size)
    return mean, mean - half, mean + half


def insample_gains(aligned: str, table, scorer_names: list[str], batch_size: int = 16,
                   max_length: int | None = None, dtype: str = "fp32") -> dict:  # fmt: skip
    """How far DPO moved the policy towards π_λ* *on the training samples*: the reference samples reweighted by
    π_aligned/π_ref (self-normalised, the weights the certificate's prediction uses for π_λ*), with log-probs
    computed the DPO way. Compared with the prediction, this separates "DPO did not learn the tilt" from "the
    tilt did not carry over to fresh samples and prompts". `table`: the training samples' scores table, as
    `bridge.tables.read_table` reads it."""
    from can_jax.certify import tilt_gains
    from train.prompts import table_ids

    missing = [c for c in ("prompt_id", "prompt", "response", "logp_ref", *scorer_names) if c not in table.column_names]
    if missing:
        raise CanError(
            f"the training samples' table lacks column(s) {missing} (give the table `can collect` wrote)"
        )
    prompts, responses = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    logp = policy_logps(aligned, prompts, responses, table_ids(table), batch_size, max_length, dtype)
    ratio = logp - table.column("logp_ref").to_numpy()
    g = np.stack([table.column(n).to_numpy() for n in scorer_names], 1)
    gains = tilt_gains(table.column("prompt_id").to_numpy(), ratio, g, 1.0)  # w ∝ π_aligned/π_ref
    return {n: float(v) for n, v in zip(scorer_names, gains, strict=True)}


def markdown(report: EvaluationReport) -> str:
    lines = [
        f"# Achieved vs predicted gains ({report.prompts} held-out prompts × {report.samples_per_prompt} "
        f"samples per policy, β = {report.beta:g})",
        "",
        "| score | role | margin | predicted gain (certificate) | on the training samples | achieved gain (held out) "
        "| 95% interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        lo, hi = r.ci95
        lines.append(f"| {r.name} | {r.role} | {cell(r.margin)} | {cell(r.predicted_gain)} | {cell(r.insample_gain)} | "
                     f"{r.achieved_gain:+.3f} | "
                     f"[{lo:+.3f}, {hi:+.3f}] |")  # fmt: skip
    lines += ["", "Gains are in the safe direction for constraints (a cost's decrease counts as a gain). "
              "\"On the training samples\": the reference samples the dual saw, reweighted by π_aligned/π_ref — "
              "how far DPO moved the policy towards π_λ* where the prediction was made; the held-out column adds "
              "fresh samples on new prompts.", "", *([f"**Note:** {report.note}", ""] if report.note else []),
              *health_lines(report.text),
              "![gains](evaluation.png)", "", "## Examples (first sample of each policy)", ""]  # fmt: skip
    for e in report.examples:
        lines += [f"**{e['prompt']}**", "", f"- reference: {e['reference']!r}", f"- aligned: {e['aligned']!r}", ""]
    return "\n".join(lines) + "\n"


def health_lines(text: dict | None) -> list[str]:
    """The degeneration check and KL as markdown lines (nothing for a report written before they existed)."""
    if not text:
        return []
    d, lp, n = text["distinct_2"], text["logp_ref_per_token"], text["mean_tokens"]
    return ["| samples | distinct-2 | mean log π_ref per token | mean tokens |", "|---|---|---|---|",
            f"| aligned | {d['aligned']:.3f} | {lp['aligned']:+.3f} | {n['aligned']:.1f} |",
            f"| reference | {d['reference']:.3f} | {lp['reference']:+.3f} | {n['reference']:.1f} |", "",
            f"KL(π_aligned ‖ π_ref) ≈ {text['kl']:.2f} nats per response (mean of log π_aligned − log π_ref over "
            "the aligned samples). Text that games the lexical scorers by breaking down shows as lower distinct-2 "
            "or a much lower log π_ref per token than the reference's own samples.", ""]  # fmt: skip


def plot(rows: tuple[GainRow, ...], path) -> None:
    plt = pyplot()

    names = [r.name for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 3.6))
    pred = [np.nan if r.predicted_gain is None else r.predicted_gain for r in rows]
    ach = [r.achieved_gain for r in rows]
    err = [[a - r.ci95[0] for a, r in zip(ach, rows)], [r.ci95[1] - a for a, r in zip(ach, rows)]]
    ins = [np.nan if r.insample_gain is None else r.insample_gain for r in rows]
    ax.bar(x - 0.27, pred, 0.27, label="predicted (certificate)")
    if not np.isnan(ins).all():
        ax.bar(x, ins, 0.27, label="aligned, on the training samples")
    ax.bar(x + 0.27, ach, 0.27, yerr=err, capsize=4, label="achieved on held-out prompts (95% CI)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_ylabel("gain over the reference policy")
    ax.legend(fontsize=8)
    write_figure(path, fig)
