"""PeCAN tables (DESIGN §3): what `can collect --aligned` recorded, and the two KL estimates side by side.

A PeCAN scores table has, per pre-aligned model NAME, the column NAME = β·ℓ (ℓ = log π_NAME − log π_ref of the
sampled response), logp_NAME, kl_NAME (Σ_t KL(π_ref ‖ π_NAME) along the sample) and ref_NAME = −β·kl_NAME, and the
models' β in the table's collect record (`bridge.scores_table`). The dual is the MoCAN dual on these columns
(`bridge.tables`, `can_jax.dual`), with E_ref[g̃_j | x] taken from ref_NAME (token-level KL)
or from the sample mean of g̃_j.
"""

from __future__ import annotations

import os

import numpy as np

from bridge.tables import group_prompts, read_table
from can_jax.errors import ScoresFormatError

KL_ESTIMATES = ("token", "sample")


def pecan_models(path: str | os.PathLike) -> dict:
    """{NAME: {"policy", "beta"}} of the pre-aligned models a PeCAN table was collected with."""
    from bridge.scores_table import collect_record

    models = collect_record(path).pecan
    if not models:
        raise ScoresFormatError(f"{path} is not a PeCAN table: collect it with `can collect --aligned NAME=DIR ...`")
    return models


def reference_columns(path: str | os.PathLike, reward: str, constraints: list[str], kl: str = "token") -> dict:
    """Checks that the reward and constraints are pre-aligned models of the table; {constraint: ref column} for
    `load_scores` (empty for the sample-mean estimate)."""
    if kl not in KL_ESTIMATES:
        raise ScoresFormatError(f"--kl {kl!r}: use one of {', '.join(KL_ESTIMATES)}")
    models = pecan_models(path)
    unknown = [n for n in [reward, *constraints] if n not in models]
    if unknown:
        raise ScoresFormatError(f"--pecan: {unknown} are not pre-aligned models of {path} (it has {sorted(models)})")
    return {n: f"ref_{n}" for n in constraints} if kl == "token" else {}


def certificate_block(path: str | os.PathLike, reward: str, constraints: list[str], kl: str,
                      prompt_id: str = "prompt_id") -> dict:  # fmt: skip
    """The `pecan` block of a PeCAN certificate: the models used, where E_ref came from, both KL estimates."""
    models = pecan_models(path)
    return {"models": {n: models[n] for n in [reward, *constraints]}, "reference": kl,
            "kl": kl_summary(path, constraints, prompt_id)}  # fmt: skip


def kl_summary(path: str | os.PathLike, names: list[str], prompt_id: str = "prompt_id") -> dict:
    """Both estimates of KL(π_ref ‖ π_NAME)(x), averaged over prompts, with their spread (DESIGN §3).

    sample: the per-prompt mean of −ℓ = log π_ref − log π_NAME over the K samples; token: the per-prompt mean of
    the full-vocabulary KL summed along each sample. Each comes with the average within-prompt standard error
    (std over the K samples / √K), the noise each puts into E_ref[g̃ | x], and the correlation of the two
    per-prompt estimates.
    """
    table = read_table(path)
    ids, _ = group_prompts(table.column(prompt_id))
    counts = np.bincount(ids)
    logp_ref = np.asarray(table.column("logp_ref").to_numpy(zero_copy_only=False), float)
    out = {}
    for name in names:
        sample = logp_ref - np.asarray(table.column(f"logp_{name}").to_numpy(zero_copy_only=False), float)
        token = np.asarray(table.column(f"kl_{name}").to_numpy(zero_copy_only=False), float)
        row = {}
        per_prompt = {}
        for label, v in (("sample", sample), ("token", token)):
            mean = np.bincount(ids, v) / counts
            var = np.bincount(ids, (v - mean[ids]) ** 2) / np.maximum(counts - 1, 1)
            per_prompt[label] = mean
            row[label] = float(mean.mean())
            row[f"{label}_se"] = float(np.sqrt(var / counts).mean())
        row["correlation"] = float(np.corrcoef(per_prompt["sample"], per_prompt["token"])[0, 1])
        out[name] = row
    return out
