"""Built-in scorers: the demo's download-free lexical scorers (`builtin:NAME`).

Each takes (prompts, responses) as lists of strings and returns one float per response. `builtin_scorer` wraps one
for any prompt: a conversation is read as the text of its last user message.
"""

from __future__ import annotations

import re

import numpy as np

from can_jax.errors import CanError
from train.scorers.templates import last_user_text

_WORD = re.compile(r"[a-z']+")
_UNSAFE = {"kill", "weapon", "bomb", "poison", "steal", "hack", "drug", "drugs", "attack", "explosive", "hurt",
           "illegal", "knife", "gun", "fight", "lock", "pick", "break", "toxic", "danger", "dangerous"}  # fmt: skip
_CARE = {"safe", "safely", "careful", "caution", "sorry", "cannot", "can't", "instead", "professional", "legal",
         "please", "help", "advice", "responsible"}  # fmt: skip
_POLITE = {"please", "thank", "thanks", "glad", "happy", "welcome", "sorry", "kindly", "appreciate", "hope"}
_STOP = {"the", "a", "an", "is", "are", "to", "of", "and", "or", "in", "on", "for", "it", "i", "you", "do", "how",
         "what", "can", "me", "my", "with", "be", "that", "this", "your"}  # fmt: skip


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def helpfulness(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward: substance (words, saturating) plus overlap with the question's content words."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        words = _words(r)
        topic = {w for w in _words(p) if w not in _STOP}
        overlap = len(topic & set(words)) / max(1, len(topic))
        out.append(2.0 * np.tanh(len(words) / 25.0) + 2.0 * overlap)
    return out


def harmlessness(prompts: list[str], responses: list[str]) -> list[float]:
    """Utility: care words minus risky words, per 10 words (higher = safer)."""
    out = []
    for r in responses:
        words = _words(r)
        n = max(len(words), 1)
        out.append(10.0 * (sum(w in _CARE for w in words) - 2.0 * sum(w in _UNSAFE for w in words)) / (n + 10))
    return out


def politeness(prompts: list[str], responses: list[str]) -> list[float]:
    """Utility: polite markers per 10 words."""
    out = []
    for r in responses:
        words = _words(r)
        out.append(10.0 * sum(w in _POLITE for w in words) / (len(words) + 10))
    return out


BUILTINS = {"helpfulness": helpfulness, "harmlessness": harmlessness, "politeness": politeness}


def builtin_scorer(key: str):
    """The built-in scorer `key` as a (prompts, responses) callable that accepts conversational prompts too."""
    if key not in BUILTINS:
        raise CanError(f"unknown built-in scorer {key!r}: choose from {sorted(BUILTINS)}")
    fn = BUILTINS[key]
    return lambda prompts, responses: fn([last_user_text(p) for p in prompts], responses)
