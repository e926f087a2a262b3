"""Scorers: (instructions, responses) → one float per response (DESIGN §5b).

A scorer spec is one of
- `builtin:NAME` — the demo's download-free lexical scorers below;
- `module:function` — any Python callable taking (prompts, responses) lists and returning floats;
- a directory — a Transformers sequence-classification model with one output (a Safe-RLHF-style reward or cost
  model), read at the last attended token with right padding, on text rendered by its template.
Every scorer records its template; scores must not depend on the batch size (tested).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from can_jax.errors import CanError

SAFE_RLHF_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"

# ------------------------------------------------------------------------------------------- built-in scorers
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


# ------------------------------------------------------------------------------------------- scorer objects
@dataclass
class Scorer:
    name: str
    spec: str
    template: str = "{prompt} / {response}"
    fn: object = field(default=None, repr=False)

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        try:
            values = np.asarray(self.fn(prompts, responses), dtype=float).reshape(-1)
        except Exception as err:  # a user's scorer failing is a user error, reported in one line
            raise CanError(f"scorer {self.name!r} ({self.spec}) raised {type(err).__name__}: {err}") from None
        if values.shape != (len(responses),):
            raise CanError(f"scorer {self.name!r} returned {values.shape[0]} values for {len(responses)} responses")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise CanError(f"scorer {self.name!r} returned NaN/inf for responses {bad[:8].tolist()} of this batch")
        return values


class ClassifierScore:
    """A sequence-classification model with one output, read at the last attended token (right padding)."""

    def __init__(self, path: str, template: str, device: str | None = None, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "right"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.template, self.batch_size = template, batch_size

    def __call__(self, prompts, responses):
        import torch

        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i : i + self.batch_size], return_tensors="pt", padding=True).to(self.device)
                out.append(self.model(**enc).logits[:, 0].float().cpu())
        return torch.cat(out).numpy()


def make_scorer(name: str, spec: str, template: str = SAFE_RLHF_TEMPLATE) -> Scorer:
    """Builds a scorer from its spec (see the module docstring)."""
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTINS:
            raise CanError(f"unknown built-in scorer {key!r}: choose from {sorted(BUILTINS)}")
        return Scorer(name, spec, "lexical, on the response text", BUILTINS[key])
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").exists():
            raise CanError(f"scorer {name!r}: {spec} has no config.json (not a Transformers model directory)")
        return Scorer(name, spec, template, ClassifierScore(spec, template))
    module, sep, attr = spec.partition(":")
    if not sep:
        raise CanError(f"scorer {name!r}: {spec!r} is not builtin:NAME, module:function or a model directory")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise CanError(f"scorer {name!r}: cannot import {spec!r}: {err}") from None
    return Scorer(name, spec, f"python callable {spec}", fn)


def parse_scorer(text: str) -> tuple[str, str]:
    """`NAME=SPEC` → (name, spec)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise CanError(f"scorer {text!r} is not of the form NAME=SPEC (e.g. harm=builtin:harmlessness)")
    return name, spec
