"""Options shared by the language-model stages (collect, evaluate), and `defaults_from`: the options whose default
lives in a stage's config dataclass, so that each default is written once."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Annotated, Optional, get_args, get_type_hints

import typer

from train.scorers import ScorerOptions


class _FromConfig:
    def __repr__(self) -> str:
        return "FROM_CONFIG"


# The default of an option whose value is a config field's default (filled in by `defaults_from`).
FROM_CONFIG = _FromConfig()


def field_default(f: dataclasses.Field):
    """A dataclass field's default (`dataclasses.MISSING` for a required field)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def config_field(configs, rename: dict, name: str) -> dataclasses.Field | None:
    """The config field a command's parameter `name` stands for: `rename[name]` (a field name, or (config, field
    name), or None: no field) or `name` itself, in the first of `configs` that has it; None if none has."""
    target = rename.get(name, name)
    if target is None:  # a parameter of the command's own that shares a field's name
        return None
    if isinstance(target, tuple):
        configs, target = (target[0],), target[1]
    for cfg in configs:
        fields = {f.name: f for f in dataclasses.fields(cfg)}
        if target in fields:
            return fields[target]
    return None


def defaults_from(*configs, rename: dict | None = None):
    """Decorator of a command: each parameter whose default is `FROM_CONFIG` takes the default of its config field
    (`config_field`) and the field's `help` metadata where its option has no help of its own. Registers (configs,
    rename, the parameters it filled) on the command for the test that holds every command's options against its
    configs."""
    rename = rename or {}

    def field_of(name: str) -> dataclasses.Field:
        f = config_field(configs, rename, name)
        if f is None:
            raise TypeError(f"option {name!r}: no field {rename.get(name, name)!r} in {[c.__name__ for c in configs]}")
        return f

    def wrap(fn):
        sig = inspect.signature(fn)
        hints = get_type_hints(fn, include_extras=True)
        params, filled = [], set()
        for p in sig.parameters.values():
            # typer reads the signature as given: its annotations evaluated (they are strings in a module with
            # postponed evaluation).
            p = p.replace(annotation=hints.get(p.name, p.annotation))
            if p.default is FROM_CONFIG:
                f = field_of(p.name)
                filled.add(p.name)
                default = field_default(f)
                if default is dataclasses.MISSING:
                    raise TypeError(f"option {p.name!r}: field {f.name!r} has no default")
                # A repeatable option's "none given" is typer's None.
                p = p.replace(default=None if default == [] else default)
                help_text = f.metadata.get("help")
                base, *infos = get_args(hints[p.name]) or (hints[p.name],)
                if help_text and infos and infos[0].help is None:
                    info = copy.copy(infos[0])  # an alias's option is shared by other commands
                    info.help = help_text
                    p = p.replace(annotation=Annotated[base, info])
                    fn.__annotations__[p.name] = p.annotation
            params.append(p)
        fn.__signature__ = sig.replace(parameters=params)
        fn.can_configs = (configs, rename, filled)
        return fn

    return wrap

ChatTemplateOpt = Annotated[
    bool,
    typer.Option(
        "--chat-template/--no-chat-template",
        help="Text prompts go through the policy's chat template as one-turn user conversations (TRL applies it, "
        "once, as token ids). Conversational prompts (.jsonl, TRL's format) always use it.",
    ),
]
# The score models' options (`train.scorers.ScorerOptions` holds their defaults and help).
ScorerTemplateOpt = Annotated[str, typer.Option()]
ScorerDtypeOpt = Annotated[str, typer.Option()]
ScorerMaxLengthOpt = Annotated[Optional[int], typer.Option()]
ScorerBatchOpt = Annotated[int, typer.Option()]
# Where a config holds them as one `ScorerOptions` (evaluate, refine).
SCORER_OPTIONS = {f"scorer_{name}": (ScorerOptions, name) for name in ("template", "dtype", "max_length", "batch_size")}

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
        "by a few hundredths move λ by η × 0.0x (the scale on the demo: docs/RESULTS.md, \"CAID's step size\")."
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
