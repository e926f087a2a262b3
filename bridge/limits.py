"""Absolute limits: Safe-RLHF users state "expected cost ≤ d", not an improvement over the reference.

The dual's constraints are relative, E_π[g] − E_ref[g] ≥ b (DESIGN §1). A limit becomes the margin it implies,
measured on the same samples of π_ref the dual reads: for a cost c (utility g = −c), E_π[c] ≤ d ⇔ b = E_ref[c] − d
(DESIGN §6); for a utility, E_π[g] ≥ τ ⇔ b = τ − E_ref[g]. E_ref is the mean over prompts of each prompt's
sample mean (`can_jax.dual.reference_utility`, the one the dual uses). The certificate records the limit, E_ref and
the implied margin. Under PeCAN the utilities are log-ratios without absolute units: limits are refused there.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bridge.tables import ConstraintSpec, parse_column_value
from can_jax.errors import CanError

KINDS = {"cost": "at most", "utility": "at least"}


def limit_specs(at_most: list[str], at_least: list[str]) -> tuple[list[ConstraintSpec], dict[str, tuple[str, float]]]:
    """Constraint specs for the limits (margins set later by `apply_limits`) and name → (kind, value)."""
    specs, limits = [], {}
    for kind, texts in (("cost", at_most), ("utility", at_least)):
        for text in texts:
            col, value = parse_column_value(text, "--cost-at-most" if kind == "cost" else "--at-least", "limit")
            if col in limits:
                raise CanError(f"{col!r} has two limits: give one")
            specs.append(ConstraintSpec(col, 0.0, kind))
            limits[col] = (kind, value)
    return specs, limits


def apply_limits(loaded, limits: dict[str, tuple[str, float]]):
    """(loaded with the implied margins, the certificate's `limits` block)."""
    from can_jax.dual import reference_utility

    if not limits:
        return loaded, {}
    if loaded.ref_columns:
        raise CanError("absolute limits need utilities in absolute units; under --pecan they are β·log-ratios: "
                       "give relative margins (--constraint/--cost)")  # fmt: skip
    ref = np.asarray(reference_utility(loaded.scores), float)  # [N, m], costs already negated
    valid = np.asarray(loaded.scores.mask).any(axis=1)
    e_ref = ref[valid].mean(axis=0)
    margins = np.array(loaded.margins, float)
    block = {}
    for j, name in enumerate(loaded.names):
        if name not in limits:
            continue
        kind, value = limits[name]
        if kind == "cost":
            reference = -e_ref[j]  # E_ref[c]
            margins[j] = reference - value
        else:
            reference = e_ref[j]
            margins[j] = value - reference
        block[name] = {"kind": KINDS[kind], "value": value, "reference_mean": float(reference),
                       "implied_margin": float(margins[j])}  # fmt: skip
    return dataclasses.replace(loaded, margins=margins), block


def limit_text(name: str, entry: dict) -> str:
    """A limit as the user stated it: "E[cost] ≤ 0" (--cost-at-most cost=0) or "E[safe] ≥ 0.5" (--at-least)."""
    sign = "≤" if entry.get("kind") == KINDS["cost"] else "≥"
    return f"E[{name}] {sign} {_typed(entry.get('value'))}"


def _typed(value) -> str:
    """A number as typed: 0, 0.25, 1e-05 (the shortest repr, integers without ".0")."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def limit_lines(block: dict) -> list[str]:
    """The summary line of each limit: as stated, then E_ref on these samples and the margin it implies."""
    lines = []
    for name, entry in block.items():
        ref, b = entry.get("reference_mean"), entry.get("implied_margin")
        if ref is None or b is None:
            continue
        lines.append(f"limit {limit_text(name, entry)}: the reference policy's E_ref[{name}] = {ref:.6g} on these "
                     f"samples, so the margin is b = {b:+.6g}")  # fmt: skip
    return lines


def infeasible_limits_message(result, names: list[str], margins, block: dict) -> str | None:
    """The infeasibility of a problem stated (partly) in limits, said in limits: per limit out of reach, the limit
    asked and the best expected value a policy on these samples reaches (E_ref plus or minus the reach). None when
    no limit is out of reach alone (the margins' message then says which combination is)."""
    reach = np.asarray(result.reach, float)
    margins = np.asarray(margins, float)
    parts, other = [], []
    for j, name in enumerate(names):
        size = max(abs(reach[j]), abs(margins[j]))
        if not margins[j] >= reach[j] - 1e-9 * size or (reach[j] <= 1e-12 * size and margins[j] <= 1e-9 * size):
            continue
        entry = block.get(name)
        if entry is None:
            other.append(f"{name!r} asks for a gain of {margins[j]:+.6g}, at most {reach[j]:+.6g} is reachable")
            continue
        ref = float(entry["reference_mean"])
        if entry["kind"] == KINDS["cost"]:
            best, word = ref - reach[j], "least"
        else:
            best, word = ref + reach[j], "most"
        if margins[j] > reach[j]:
            parts.append(f"{limit_text(name, entry)} is out of reach: the {word} E[{name}] a policy on these "
                         f"samples attains is {best:.6g} (E_ref[{name}] = {ref:.6g})")  # fmt: skip
        else:
            parts.append(f"{limit_text(name, entry)} is the very edge of what these samples reach (E_ref[{name}] = "
                         f"{ref:.6g}), which only an infinite λ attains")  # fmt: skip
    if not parts:
        return None
    return "infeasible limits: " + "; ".join(parts + other)
