"""The model card (README.md) of an aligned policy: λ*, margins or limits, β, predicted gains, and how it was made."""

from __future__ import annotations

import json


def model_card(cert, record: dict, base_model: str, settings: dict) -> str:
    """README.md text for a policy aligned on a preference set with `record` under the `Certificate` `cert` (None
    for a plain preference table)."""
    lines = ["---", "library_name: transformers", "tags:", "- can", "- dpo", "- trl", "- constrained-alignment",
             f"base_model: {base_model}", "---", "", "# Aligned with CAN (one-shot constrained alignment)", "",
             f"DPO of `{base_model}` on pseudo-preferences labelled from r + λ*ᵀg (CAN, arXiv 2405.19544): one "
             "dual solve gave λ*, one unconstrained DPO realises π_λ*.", ""]  # fmt: skip
    lines += [f"- β (KL weight of the dual and of DPO): {settings.get('beta')}", f"- labels: {record.get('mode')}"]
    if cert is not None:
        lines += cert.markdown()
    lines += ["## How it was made", "", "```json", json.dumps({"preferences": record, "dpo": settings}, indent=2,
              default=str), "```", ""]  # fmt: skip
    return "\n".join(lines)
