"""Scorers: (prompts, responses) → one float per response (DESIGN §5b).

A scorer spec is one of
- `builtin:NAME` — the demo's download-free lexical scorers below;
- `module:function` — any Python callable taking (prompts, responses) lists and returning floats. The module is
  imported as `python -m` would: the working directory comes first on the import path, so `-s x=myscorer:fn` finds
  `./myscorer.py` under the `can` console script too;
- a model directory, or a Hugging Face Hub id (`org/name`) already in the local Hugging Face cache (offline only, see
  `train.models.resolve_model_dir`) — a score model, read below.

Prompts. A prompt is a string or a conversation in TRL's conversational format: a list of {"role", "content"} dicts
(roles system/user/assistant, possibly multi-turn with earlier assistant turns), ending with a user message. Built-in
scorers read the text of that last user message. Module functions receive each prompt as given (str or list of
dicts). Score models render the conversation with their template (below).

Score models (one float per text, computed in the dtype asked for, read in float32):
- Safe-RLHF score models (PKU-Alignment/safe-rlhf `LlamaForScore` & co., e.g. the beaver-7b reward and cost
  models): a transformers backbone saved under its base-model prefix (`model.` for Llama) plus a linear
  `score_head` (config fields `score_dim`, `bias`, `score_type`, `do_normalize`, `normalizer_type`, `mean`, `var`).
  The backbone is loaded with `AutoModel` and the `score_head` weights are read from the checkpoint files
  (safetensors, sharded index, or pytorch_model.bin) — safe-rlhf need not be installed. The score is the head applied
  to the backbone's last hidden state at the last attended token (right padding), as safe-rlhf's `end_scores`.
  `do_normalize` is honoured as safe-rlhf does (reward: (x − mean)/(std + 1e-8); cost: x/(std + 1e-8); critic: x),
  with mean/var from the checkpoint's `normalizer.*` buffers, else from the config, else 0 and 1. Anything else
  (score_dim ≠ 1, an unknown score_type or normalizer) is refused in one line. Values are returned with the model's
  own sign: for a Safe-RLHF cost model, cost > 0 means unsafe (use it with `can dual --cost`); `Scorer.score_type`
  records "reward" or "cost".
- any `AutoModelForSequenceClassification` model with one output, through its own forward (decoder classifiers
  read the last token that is not the pad token, as transformers does). A head whose weights are not in the
  checkpoint (transformers would initialise it at random — e.g. a Safe-RLHF model read this way) is a CanError
  naming the missing weights.

Templates (`template=`), how a prompt and a response become the scored text:
- "safe-rlhf": Safe-RLHF's conversation format, as their score models were trained (their PreferenceDataset:
  prompt + answer + EOS, tokenised with the tokenizer's special tokens, i.e. a Llama BOS):
  `BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT:{a1}<eos>USER: {u2} ASSISTANT:{response}<eos>` — every user turn
  is `USER: {text} ASSISTANT:`, every earlier assistant turn is its text followed by the EOS token, and the scored
  response ends with the EOS token (left out where the tokenizer has none). The format has no system role: system
  messages are dropped; user and assistant turns must alternate.
- "chat": the scorer tokenizer's own chat template applied to the conversation plus {"role": "assistant",
  "content": response} (tokenised without adding special tokens again: the template writes its own BOS).
- any other string: a format string with `{prompt}` and `{response}`, tokenised with the tokenizer's special
  tokens. A plain prompt fills `{prompt}` as is; a conversation fills it with its earlier messages, one per line as
  `Role: content` (System/User/Assistant), followed by the text of its last user message — a one-message
  conversation gives exactly the plain prompt.
- "auto" (default): "safe-rlhf" for a Safe-RLHF score model, "chat" for a classifier whose tokenizer has a chat
  template, else "safe-rlhf".

Truncation: texts longer than `max_length` tokens (default: the model's `max_position_embeddings`) keep their last
`max_length` tokens — the end of the response, where the score is read, is never cut; the beginning of the prompt is
(a leading BOS is kept). `Scorer.truncated` counts the texts cut so far.

dtype: "fp32" (default), "bf16" or "fp16" for the model; the Safe-RLHF head is applied in float32 to the end hidden
state. Scores do not depend on the batch size: in fp32 up to float rounding (tested to 1e-5); in bf16 within 2%
relative / 0.02 absolute (tested; padding changes the shapes of the reductions, bf16's relative precision is 2^-8).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from can_jax.errors import CanError

SAFE_RLHF = "safe-rlhf"
SAFE_RLHF_TEMPLATE = SAFE_RLHF  # name kept for callers of the old format-string constant
_SAFE_BEGIN, _SAFE_USER, _SAFE_ASSISTANT = "BEGINNING OF CONVERSATION: ", "USER: {} ", "ASSISTANT:"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

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


# ------------------------------------------------------------------------------------------- conversations
def as_messages(prompt) -> list[dict]:
    """A prompt as a conversation: a string is one user message; a conversation is checked (ends with a user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    try:
        messages = [dict(m) for m in prompt]
    except (TypeError, ValueError):
        raise CanError(
            f"a prompt must be a string or a list of {{role, content}} messages, not {prompt!r:.80}"
        ) from None
    for m in messages:
        if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise CanError(f"a conversation message needs role system/user/assistant and text content: {m!r:.80}")
    if not messages or messages[-1]["role"] != "user":
        raise CanError("a conversational prompt must end with a user message (the one the response answers)")
    return messages


def last_user_text(prompt) -> str:
    """The text a built-in scorer reads: the prompt itself, or the content of a conversation's last user message."""
    return as_messages(prompt)[-1]["content"]


def render_prompt(prompt) -> str:
    """What a conversation puts in a template's `{prompt}`: earlier messages as `Role: content` lines, then the
    last user message's text (a plain prompt, or a one-message conversation, is its text as is)."""
    messages = as_messages(prompt)
    lines = [f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1]]
    return "".join(lines) + messages[-1]["content"]


def render_safe_rlhf(prompt, response: str, eos: str | None) -> str:
    """Safe-RLHF's multi-turn format (see the module docstring)."""
    turns = [m for m in as_messages(prompt) if m["role"] != "system"]
    parts = [_SAFE_BEGIN]
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise CanError("the Safe-RLHF template needs alternating user/assistant turns starting with a user turn")
        parts.append(_SAFE_USER.format(m["content"]) + _SAFE_ASSISTANT if i % 2 == 0 else m["content"] + (eos or ""))
    return "".join(parts) + response + (eos or "")


# ------------------------------------------------------------------------------------------- scorer objects
@dataclass
class Scorer:
    name: str
    spec: str
    template: str = "{prompt} / {response}"
    fn: object = field(default=None, repr=False)
    score_type: str | None = None  # "reward" / "cost" where the model says so (Safe-RLHF's config.score_type)

    def __call__(self, prompts: list, responses: list[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise CanError(f"scorer {self.name!r}: {len(prompts)} prompts for {len(responses)} responses")
        try:
            values = np.asarray(self.fn(list(prompts), list(responses)), dtype=float).reshape(-1)
        except CanError:
            raise
        except Exception as err:  # a user's scorer failing is a user error, reported in one line
            raise CanError(f"scorer {self.name!r} ({self.spec}) raised {type(err).__name__}: {err}") from None
        if values.shape != (len(responses),):
            raise CanError(f"scorer {self.name!r} returned {values.shape[0]} values for {len(responses)} responses")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise CanError(f"scorer {self.name!r} returned NaN/inf for responses {bad[:8].tolist()} of this batch")
        return values

    def record(self) -> dict:
        """This scorer's settings, for a certificate or a scores file (fixed for its life: comparable on resume)."""
        out = {"spec": self.spec, "template": self.template}
        if self.score_type:
            out["score_type"] = self.score_type
        if isinstance(self.fn, ModelScore):
            out.update(self.fn.record())
        return out

    @property
    def truncated(self) -> int:
        """How many texts a score model has truncated so far (0 for other scorers)."""
        return self.fn.truncated if isinstance(self.fn, ModelScore) else 0


@contextmanager
def _quiet_transformers():
    """Loading reports and progress bars go to the terminal through transformers' logging: the library never prints."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Weight name → file holding it, for safetensors / sharded / pytorch_model.bin checkpoints."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            return {k: path / f for k, f in weight_map.items()}
    if (path / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(path / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        import torch

        return dict.fromkeys(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True),
                             path / "pytorch_model.bin")  # fmt: skip
    raise CanError(f"score model {path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def _read_tensors(files: dict[str, Path], names: list[str]) -> dict:
    import torch

    out = {}
    for name in names:
        file = files[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, "pt") as f:
                out[name] = f.get_tensor(name).float()
        else:
            out[name] = torch.load(file, map_location="cpu", weights_only=True)[name].float()
    return out


class ModelScore:
    """A score model (Safe-RLHF or sequence classification, see the module docstring) on rendered texts."""

    def __init__(self, path: str, template: str = "auto", device: str | None = None, batch_size: int = 16, *,
                 dtype: str = "fp32", max_length: int | None = None):  # fmt: skip
        import torch
        from transformers import AutoTokenizer

        path = Path(path)
        if dtype not in DTYPES:
            raise CanError(f"scorer dtype {dtype!r}: choose from {sorted(DTYPES)}")
        if batch_size < 1:
            raise CanError(f"scorer batch size must be ≥ 1, not {batch_size}")
        if not (path / "config.json").exists():
            raise CanError(f"scorer {path} has no config.json (not a Transformers model directory)")
        config = json.loads((path / "config.json").read_text())
        files = _checkpoint_files(path)
        self.dtype, self.batch_size, self.truncated, self.path = dtype, batch_size, 0, str(path)
        self.safe_rlhf = "score_head.weight" in files or any(
            a.endswith("ForScore") for a in config.get("architectures") or []
        )
        torch_dtype = getattr(torch, DTYPES[dtype])
        with _quiet_transformers():
            self.tok = AutoTokenizer.from_pretrained(path)
            if self.safe_rlhf:
                self._load_safe_rlhf(path, config, files, torch_dtype)
            else:
                self._load_classifier(path, torch_dtype)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        if template == "auto":
            template = SAFE_RLHF if self.safe_rlhf or not self.tok.chat_template else "chat"
        if template == "chat" and not self.tok.chat_template:
            raise CanError(f"scorer {path}: template 'chat' but its tokenizer has no chat template")
        if template not in (SAFE_RLHF, "chat"):
            try:
                template.format(prompt="", response="")
            except (KeyError, IndexError, ValueError) as err:
                raise CanError(f"scorer template {template!r} is not a format string with {{prompt}} and "
                               f"{{response}} only ({type(err).__name__}: {err})") from None  # fmt: skip
            if "{response}" not in template:
                raise CanError(f"scorer template {template!r} has no {{response}}")
        self.template = template
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = max_length or limit
        if self.max_length is not None and self.max_length < 2:
            raise CanError(f"scorer max_length must be ≥ 2 tokens, not {self.max_length}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()

    def _load_safe_rlhf(self, path, config, files, torch_dtype):
        import torch
        from transformers import AutoModel

        if "score_head.weight" not in files:
            raise CanError(f"Safe-RLHF score model {path}: no score_head.weight in its checkpoint")
        if config.get("score_dim", 1) != 1:
            raise CanError(
                f"score model {path}: score_dim {config['score_dim']} (only one score per text is supported)"
            )
        self.score_type = config.get("score_type", "reward")
        functions = {"reward": "affine", "cost": "scale", "critic": "identity"}
        if self.score_type not in functions:
            raise CanError(f"score model {path}: unknown score_type {self.score_type!r} (reward, cost or critic)")
        if config.get("normalizer_type") not in (None, "RunningMeanStd", "ExponentialMovingAverage"):
            raise CanError(f"score model {path}: unsupported normalizer_type {config['normalizer_type']!r}")
        names = ["score_head.weight"] + (["score_head.bias"] if "score_head.bias" in files else [])
        if config.get("bias", False) and "score_head.bias" not in files:
            raise CanError(f"score model {path}: config says bias but the checkpoint has no score_head.bias")
        self.normalize = None
        if config.get("do_normalize", False):
            stats = {}
            for key in ("mean", "var"):
                if f"normalizer.{key}" in files:
                    stats[key] = _read_tensors(files, [f"normalizer.{key}"])[f"normalizer.{key}"].reshape(-1)
                elif config.get(key) is not None:
                    stats[key] = torch.tensor(config[key], dtype=torch.float32).reshape(-1)
                else:
                    stats[key] = torch.tensor([0.0 if key == "mean" else 1.0])
                if stats[key].numel() != 1:
                    raise CanError(f"score model {path}: normalizer {key} has {stats[key].numel()} values, not 1")
            self.normalize = (functions[self.score_type], float(stats["mean"][0]), float(stats["var"][0]))
        head = _read_tensors(files, names)
        self.head_w = head["score_head.weight"].reshape(1, -1)
        self.head_b = head.get("score_head.bias", torch.zeros(1)).reshape(1)
        try:
            self.model, info = AutoModel.from_pretrained(path, dtype=torch_dtype, output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CanError(
                f"score model {path}: its backbone does not load with transformers AutoModel: {first}"
            ) from None
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])[:8]
            raise CanError(f"score model {path}: backbone weights not in the checkpoint: {missing} "
                           f"(prefix expected: '{self.model.base_model_prefix}.')")  # fmt: skip
        if self.head_w.shape[1] != self.model.config.hidden_size:
            raise CanError(f"score model {path}: score_head is {tuple(self.head_w.shape)} for hidden size "
                           f"{self.model.config.hidden_size}")  # fmt: skip

    def _load_classifier(self, path, torch_dtype):
        from transformers import AutoModelForSequenceClassification

        self.score_type = None
        try:
            self.model, info = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype,
                                                                                  output_loading_info=True)  # fmt: skip
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CanError(f"scorer {path} is not a sequence-classification model: {first}") from None
        if info["missing_keys"]:
            raise CanError(f"scorer {path}: weights not in the checkpoint (transformers would initialise them at "
                           f"random): {sorted(info['missing_keys'])[:8]}")  # fmt: skip
        if self.model.config.num_labels != 1:
            raise CanError(f"scorer {path} has {self.model.config.num_labels} outputs; a scorer needs exactly one")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = (
                self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
            )

    def record(self) -> dict:
        return {"dtype": self.dtype, "max_length": self.max_length, "path": self.path,
                "format": "safe-rlhf" if self.safe_rlhf else "sequence-classification"}  # fmt: skip

    def texts(self, prompts, responses) -> list[tuple[str, bool]]:
        """(text, add_special_tokens) for each pair, per the template."""
        out = []
        for p, r in zip(prompts, responses, strict=True):
            if self.template == SAFE_RLHF:
                out.append((render_safe_rlhf(p, r, self.tok.eos_token), True))
            elif self.template == "chat":
                messages = as_messages(p) + [{"role": "assistant", "content": r}]
                out.append((self.tok.apply_chat_template(messages, tokenize=False), False))
            else:
                out.append((self.template.format(prompt=render_prompt(p), response=r), True))
        return out

    def encode(self, prompts, responses) -> list[list[int]]:
        """Token ids of each scored text, truncated from the left to max_length (a leading BOS is kept)."""
        ids = []
        for text, special in self.texts(prompts, responses):
            seq = self.tok(text, add_special_tokens=special)["input_ids"]
            if self.max_length is not None and len(seq) > self.max_length:
                self.truncated += 1
                bos = self.tok.bos_token_id
                keep_bos = bos is not None and seq[0] == bos
                seq = ([bos] if keep_bos else []) + seq[len(seq) - self.max_length + keep_bos :]
            ids.append(seq)
        return ids

    def __call__(self, prompts, responses) -> np.ndarray:
        import torch

        ids = self.encode(prompts, responses)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), self.batch_size):
                chunk = ids[i : i + self.batch_size]
                width = max(len(s) for s in chunk)
                input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=self.device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
                if self.safe_rlhf:
                    hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
                    end = hidden[torch.arange(len(chunk), device=self.device), mask.sum(1) - 1].float().cpu()
                    out.append((end @ self.head_w.T + self.head_b)[:, 0])
                else:
                    out.append(self.model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().cpu())
        scores = torch.cat(out) if out else torch.zeros(0)
        if self.safe_rlhf and self.normalize is not None:
            function, mean, var = self.normalize
            if function == "affine":
                scores = (scores - mean) / (var**0.5 + 1e-8)
            elif function == "scale":
                scores = scores / (var**0.5 + 1e-8)
        return scores.numpy()


ClassifierScore = ModelScore  # the old name


# ------------------------------------------------------------------------------------------- specs
def _import_from_cwd(module: str):
    """Imports `module` with the working directory first on the path, as `python -m` does."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()
        return importlib.import_module(module)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def scorer_options(template: str = "auto", dtype: str = "fp32", max_length: int | None = None,
                   batch_size: int = 16) -> dict:  # fmt: skip
    """`make_scorer`'s keyword options from the CLI's --scorer-template/-dtype/-max-length/-batch-size (the template
    left out when "auto": then the scorer's own rule, or the template a certificate recorded, applies)."""
    opts = {"dtype": dtype, "max_length": max_length, "batch_size": batch_size}
    if template != "auto":
        opts["template"] = template
    return opts


def make_scorer(name: str, spec: str, template: str = "auto", *, dtype: str = "fp32", max_length: int | None = None,
                batch_size: int = 16, device: str | None = None) -> Scorer:  # fmt: skip
    """Builds a scorer from its spec (see the module docstring); the options apply to score models."""
    from train.models import is_hub_id, resolve_model_dir

    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTINS:
            raise CanError(f"unknown built-in scorer {key!r}: choose from {sorted(BUILTINS)}")
        fn = BUILTINS[key]
        return Scorer(name, spec, "lexical, on the response text",
                      lambda prompts, responses: fn([last_user_text(p) for p in prompts], responses))  # fmt: skip
    if Path(spec).is_dir() or is_hub_id(spec):
        path = resolve_model_dir(spec, f"scorer {name!r}")
        if not (path / "config.json").exists():
            raise CanError(f"scorer {name!r}: {spec} has no config.json (not a Transformers model directory)")
        model = ModelScore(str(path), template, device, batch_size, dtype=dtype, max_length=max_length)
        return Scorer(name, spec, model.template, model, model.score_type)
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise CanError(f"scorer {name!r}: {spec!r} is not builtin:NAME, module:function, a model directory "
                       "or a Hugging Face Hub id")  # fmt: skip
    try:
        fn = getattr(_import_from_cwd(module), attr)
    except (ImportError, AttributeError) as err:
        raise CanError(f"scorer {name!r}: cannot import {spec!r}: {err}") from None
    return Scorer(name, spec, f"python callable {spec}", fn)


def parse_scorer(text: str) -> tuple[str, str]:
    """`NAME=SPEC` → (name, spec)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise CanError(f"scorer {text!r} is not of the form NAME=SPEC (e.g. harm=builtin:harmlessness)")
    return name, spec
