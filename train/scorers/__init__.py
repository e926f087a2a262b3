"""Scorers: (prompts, responses) → one float per response (docs/DESIGN.md, "Ecosystem facts").

A scorer spec is one of
- `builtin:NAME` — the demo's download-free lexical scorers (`train.scorers.builtin`);
- `module:function` — any Python callable taking (prompts, responses) lists and returning floats. The module is
  imported as `python -m` would: the working directory comes first on the import path, so `-s x=myscorer:fn` finds
  `./myscorer.py` under the `can` console script too;
- a model directory, or a Hugging Face Hub id (`org/name`) already in the local Hugging Face cache (offline only, see
  `train.models.resolve_model_dir`) — a score model (`train.scorers.models`: Safe-RLHF score models and one-output
  sequence classifiers, truncation, dtype).

Prompts are strings or conversations in TRL's conversational format; how each kind of scorer reads them, and the
templates (`template=`) that turn a prompt and a response into a score model's text, are in
`train.scorers.templates`.

This package's modules, one concept each: `builtin` (lexical scorers), `templates` (conversations and templates),
`models` (score-model loading and scoring); here, the public face: the `Scorer` every stage calls, `make_scorer`
from a spec, `parse_scorer` for `NAME=SPEC`, and `scorer_options` from the CLI's options.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge.files import same_location
from can_jax.errors import CanError
from train.scorers.builtin import BUILTINS, builtin_scorer, harmlessness, helpfulness, politeness
from train.scorers.models import DTYPES, ClassifierScore, ModelScore
from train.scorers.templates import (
    SAFE_RLHF,
    SAFE_RLHF_TEMPLATE,
    as_messages,
    last_user_text,
    render_prompt,
    render_safe_rlhf,
)

__all__ = [
    "BUILTINS",
    "DTYPES",
    "SAFE_RLHF",
    "SAFE_RLHF_TEMPLATE",
    "ClassifierScore",
    "ModelScore",
    "Scorer",
    "ScorerOptions",
    "as_messages",
    "harmlessness",
    "helpfulness",
    "last_user_text",
    "make_scorer",
    "parse_scorer",
    "politeness",
    "render_prompt",
    "render_safe_rlhf",
    "scorer_field",
    "scorer_options",
]


@dataclass
class Scorer:
    """One named scorer as every stage calls it: checks lengths and finiteness, turns a failing user function into
    one CanError line, and records its settings (`record`) for certificates and scores files."""

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
        except (Exception, SystemExit) as err:  # a user's scorer failing (or exiting) is a user error, in one line
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

    def fingerprint(self) -> str:
        """SHA-256 of what makes this scorer's numbers: its spec, template and the code or model behind it (a
        function's source file; a score model's files, by content up to 16 MB and by size above, which covers its
        config and tokenizer without reading gigabytes of weights; the built-ins' module). A shard scored under
        another fingerprint is stale."""
        import hashlib
        import inspect

        from bridge.files import sha256_file

        h = hashlib.sha256(f"{self.spec}\0{self.template}\0".encode())
        if isinstance(self.fn, ModelScore):
            folder = Path(self.fn.path)
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                size = f.stat().st_size
                digest = f"size {size}" if size > 16 << 20 else sha256_file(f)
                h.update(f"{f.relative_to(folder)}\0{digest}\0".encode())
            return h.hexdigest()
        fn = self.fn
        if self.spec.startswith("builtin:"):
            from train.scorers import builtin as fn
        module = sys.modules.get(getattr(inspect.unwrap(getattr(fn, "func", fn)), "__module__", None) or "")
        try:
            source = inspect.getsourcefile(module if module is not None else fn)
        except TypeError:  # a callable object with no source file of its own
            source = None
        h.update((getattr(module, "__can_sha256__", None) or (sha256_file(source) if source and Path(source).is_file()
                  else "no source")).encode())  # fmt: skip
        return h.hexdigest()

    @property
    def truncated(self) -> int:
        """How many texts a score model has truncated so far (0 for other scorers)."""
        return self.fn.truncated if isinstance(self.fn, ModelScore) else 0


OUR_PACKAGES = ("can_jax", "bridge", "train")


def _module_file(folder: Path, module: str) -> Path | None:
    """The file of `module` (dotted) under `folder`: `a/b.py` or `a/b/__init__.py`, if there is one."""
    base = folder.joinpath(*module.split("."))
    return next((f.resolve() for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _user_module(module: str):
    """The module of a `module:function` scorer. A file of that name in the working directory is loaded by its path,
    and the working directory is on `sys.path` (last) only while it runs, for its own imports of its neighbours: a
    user's `train.py`, `bridge.py` or `can_jax.py` beside it never stands in for ours (our packages are imported
    before any user code, and their submodules are found through them). Otherwise an installed module."""
    import bridge  # noqa: F401  (the last of our top-level packages not yet imported here)

    file = _module_file(Path.cwd(), module)
    if file is None:
        return importlib.import_module(module)
    from bridge.files import sha256_file

    digest = sha256_file(file)
    loaded = sys.modules.get(module)
    ours = loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == file
    if ours and getattr(loaded, "__can_sha256__", digest) == digest:
        return loaded  # unchanged since it was loaded (an edited file is loaded again: its scores would be stale)
    top = module.split(".")[0]
    name = module if (loaded is None or ours) and top not in OUR_PACKAGES and (top not in sys.modules or ours) else (
        "_can_user_" + module.replace(".", "_"))  # fmt: skip
    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(file.parent)] if file.name == "__init__.py" else None
    )
    mod = importlib.util.module_from_spec(spec)
    mod.__can_sha256__ = digest
    sys.modules[name] = mod
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    return mod


@dataclass(frozen=True)
class ScorerOptions:
    """How score models are run (built-in and Python scorers ignore them); checked here, once."""

    template: str = field(default="auto", metadata={
        "help": "How score models read (prompt, response): auto (Safe-RLHF's conversation format for Safe-RLHF "
        "models, else the scorer's chat template if it has one), safe-rlhf, chat, or a format with {prompt} and "
        "{response}."})  # fmt: skip
    dtype: str = field(default="fp32", metadata={"help": "Score-model dtype: fp32, bf16 or fp16."})
    max_length: int | None = field(default=None, metadata={
        "help": "Score-model token limit; longer texts keep their end (the response's end)."})  # fmt: skip
    batch_size: int = field(default=16, metadata={"help": "Texts per score-model batch."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise CanError(f"--scorer-batch-size must be at least 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 1:
            raise CanError(f"--scorer-max-length must be at least 1, got {self.max_length}")

    def kwargs(self) -> dict:
        """`make_scorer`'s keyword options (the template left out when "auto": then the scorer's own rule, or the
        template a certificate recorded, applies)."""
        return scorer_options(self.template, self.dtype, self.max_length, self.batch_size)


def scorer_field(name: str):
    """A config's flat `scorer_NAME` field with `ScorerOptions`' default and help (collect and label record theirs
    flat)."""
    f = ScorerOptions.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def scorer_options(template: str = "auto", dtype: str = "fp32", max_length: int | None = None,
                   batch_size: int = 16) -> dict:  # fmt: skip
    """`make_scorer`'s keyword options from --scorer-template/-dtype/-max-length/-batch-size."""
    opts = {"dtype": dtype, "max_length": max_length, "batch_size": batch_size}
    if template != "auto":
        opts["template"] = template
    return opts


def make_scorer(name: str, spec: str, template: str = "auto", *, dtype: str = "fp32", max_length: int | None = None,
                batch_size: int = 16, device: str | None = None) -> Scorer:  # fmt: skip
    """Builds a scorer from its spec (see the package docstring); the options apply to score models."""
    from train.models import is_hub_id, resolve_model_dir

    if spec.startswith("builtin:"):
        return Scorer(name, spec, "lexical, on the response text", builtin_scorer(spec.split(":", 1)[1]))
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
        fn = getattr(_user_module(module), attr)
    except (Exception, SystemExit) as err:  # the user's module failing to import is a user error, in one line
        raise CanError(f"scorer {name!r}: cannot import {spec!r}: {type(err).__name__}: {err}") from None
    return Scorer(name, spec, f"python callable {spec}", fn)


def parse_scorer(text: str) -> tuple[str, str]:
    """`NAME=SPEC` → (name, spec)."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise CanError(f"scorer {text!r} is not of the form NAME=SPEC (e.g. harm=builtin:harmlessness)")
    return name, spec


def check_scorers(cert, names: list[str]) -> None:
    """Refuses scorers that leave out the certificate's reward or one of its constraints (the report would silently
    lack it) or name one twice."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CanError(f"scorer name(s) {dup} given twice")
    missing = [n for n in [cert.reward, *cert.names] if n not in names]
    if missing:
        raise CanError(f"no scorer for {', '.join(repr(n) for n in missing)} of the certificate (reward "
                       f"{cert.reward!r}, constraints {cert.names}): give -s NAME=SPEC for each, the scorers the "
                       "certificate's table was scored with")  # fmt: skip


def check_scorer_specs(cert, parsed: list) -> None:
    """Refuses a scorer whose spec is not the one the certificate records for its name (the rounds would measure
    another quantity under its margin); a certificate that records none is not checked."""
    recorded = cert.scorers
    for name, spec in (p[:2] for p in parsed):
        was = (recorded.get(name) or {}).get("spec")
        if was is not None and was != spec and not same_location(was, spec):
            raise CanError(f"-s {name}={spec}: the certificate's {name!r} was scored with {was!r}; give the scorers "
                           "its table was scored with")  # fmt: skip
