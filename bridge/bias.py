"""The certificate's `bias` block (format 2, DESIGN §7): `can_jax.bias.BiasReport` as JSON, and its warnings."""

from __future__ import annotations

import math

import numpy as np

METHOD = "within-prompt jackknife of the dual's estimating equation (DESIGN §7)"
SMALL = 0.5  # |bias| above this many standard errors is "not small": a 95% interval then covers less than ~92%


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def entry(c, i=None) -> dict:
    """One estimate: plain, bias, corrected, standard errors, both 95% intervals, |bias| / se."""
    from can_jax.bias import Z95

    pick = (lambda a: np.asarray(a, float)) if i is None else (lambda a: np.asarray(a, float)[i])  # noqa: E731
    plain, bias, corr, se, se_plain = (pick(a) for a in c)
    ratio = abs(bias) / se_plain if se_plain > 0 else float("nan")
    return {
        "plain": _num(plain),
        "bias": _num(bias),
        "corrected": _num(corr),
        "standard_error": _num(se),
        "plain_standard_error": _num(se_plain),
        "interval_95": [_num(corr - Z95 * se), _num(corr + Z95 * se)] if math.isfinite(se) else None,
        "plain_interval_95": [_num(plain - Z95 * se_plain), _num(plain + Z95 * se_plain)]
        if math.isfinite(se_plain)
        else None,
        "bias_over_se": _num(ratio),
    }


def bias_block(report, names: list[str]) -> dict:
    """The certificate's `bias` block for a (non-vmapped) `BiasReport`; warnings included."""
    block = {
        "method": METHOD,
        "prompts": int(report.prompts),
        "prompts_corrected": int(report.prompts_corrected),
        "lambda": {n: entry(report.lam, j) for j, n in enumerate(names)},
        "predicted": {
            "utility_gains": {n: entry(report.utility_gain, j) for j, n in enumerate(names)},
            "reward_gain": entry(report.reward_gain),
            "kl": entry(report.kl),
        },
    }
    block["warnings"] = bias_warnings(block)
    return block


def bias_warnings(block: dict) -> list[str]:
    """The warnings of a bias block: one line naming every estimate whose finite-K bias is not small against its
    standard error (> SMALL s.e.), and one for prompts that could not be jackknifed."""
    items = [(f"λ[{n}]", e) for n, e in block["lambda"].items()]
    items += [(f"gain[{n}]", e) for n, e in block["predicted"]["utility_gains"].items()]
    items += [("reward gain", block["predicted"]["reward_gain"]), ("KL", block["predicted"]["kl"])]
    big = [
        f"{label} {e['plain']:.4g} → {e['corrected']:.4g} ({e['bias_over_se']:.1f} s.e.)"
        for label, e in items
        if e.get("bias_over_se") is not None and e["bias_over_se"] > SMALL and None not in (e["plain"], e["corrected"])
    ]
    out = []
    if big:
        out.append(
            "finite-K bias not small against the standard error (plain → corrected): " + "; ".join(big) + ". The "
            "plain estimates and intervals are off by that much: use the corrected ones, or more responses per "
            "prompt (`can stability` says how many)"
        )
    missing = block["prompts"] - block["prompts_corrected"]
    if missing > 0:
        out.append(f"finite-K bias: {missing} prompt(s) with one response cannot be jackknifed and enter uncorrected")
    return out
