"""Score models: a model directory read as one float per (prompt, response) text.

Two formats (one float per text, computed in the dtype asked for, read in float32):
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

The text scored is the template's rendering of each pair (train.scorers.templates).

Truncation: texts longer than `max_length` tokens (default: the model's `max_position_embeddings`) keep their last
`max_length` tokens — the end of the response, where the score is read, is never cut; the beginning of the prompt is
(a leading BOS is kept). `ModelScore.truncated` counts the texts cut so far.

dtype: "fp32" (default), "bf16" or "fp16" for the model; the Safe-RLHF head is applied in float32 to the end hidden
state. Scores do not depend on the batch size: in fp32 up to float rounding (tested to 1e-5); in bf16 within 2%
relative / 0.02 absolute (tested; padding changes the shapes of the reductions, bf16's relative precision is 2^-8).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from can_jax.errors import CanError
from train.scorers.templates import render, resolve_template

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
        has_chat = bool(self.tok.chat_template)
        self.template = resolve_template(template, safe_rlhf=self.safe_rlhf, chat_template=has_chat, where=str(path))
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
        return [render(self.template, p, r, self.tok) for p, r in zip(prompts, responses, strict=True)]

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
