"""Options shared by the language-model stages (collect, evaluate)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ChatTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Text prompts go through the policy's chat template as one-turn user conversations (TRL applies it, "
        "once, as token ids). Conversational prompts (.jsonl, TRL's format) always use it.",
    ),
]
ScorerTemplateOpt = Annotated[
    str,
    typer.Option(
        help="How score models read (prompt, response): auto (Safe-RLHF's conversation format for Safe-RLHF "
        "models, else the scorer's chat template if it has one), safe-rlhf, chat, or a format with {prompt} and "
        "{response}.",
    ),
]
ScorerDtypeOpt = Annotated[str, typer.Option(help="Score-model dtype: fp32, bf16 or fp16.")]
ScorerMaxLengthOpt = Annotated[
    Optional[int], typer.Option(help="Score-model token limit; longer texts keep their end (the response's end).")
]
ScorerBatchOpt = Annotated[int, typer.Option(help="Texts per score-model batch.")]

# The correction round's step and start (`can refine`, `can demo --refine`).
StepOpt = Annotated[
    str,
    typer.Option(
        help="newton: the dual's Hessian as the sensitivity of the gains to λ, secant-updated from round 2; caid: "
        "CAID's fixed step λ ← [λ − η(a − b)]₊."
    ),
]
EtaOpt = Annotated[
    float,
    typer.Option(
        help="--step caid: the step size η, in λ per unit of gain shortfall: λ moves by η × (b − a), so gains short "
        "by a few hundredths move λ by η × 0.0x (on the demo η = 2 moved it by ≤ 0.08; the Newton step's first "
        "move there matched η ≈ 26 and ≈ 88 for its two constraints)."
    ),
]
SecantOpt = Annotated[
    bool,
    typer.Option(
        "--secant/--no-secant",
        help="--step newton: from round 2 on, correct the sensitivity by the secant of the last two rounds "
        "(BFGS); --no-secant keeps round 0's Hessian (a chord step).",
    ),
]
StartOpt = Annotated[
    Optional[str],
    typer.Option(
        help="previous: each round's DPO continues from the previous round's policy, π_ref staying the DPO reference; "
        "reference: it starts from π_ref. Default: previous, or reference with --lora (an adapter's DPO reference is "
        "its base model).",
        show_default=False,
    ),
]
