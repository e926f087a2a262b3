"""Each default is written once: every command's options take their defaults from the stage's config dataclass
(`train.cli.options.defaults_from`), so the CLI, the demo and the Python API cannot drift apart. The test walks every
command of `can`: an option standing for a config field must take its default from it (never a second copy, even an
equal one), with the same value; and every field of a command's own configs must have an option, unless it is listed
below as internal, with the reason."""

import dataclasses
from pathlib import Path

import typer

from bridge.dual import DualConfig
from train.chain import RefineConfig
from train.cli import app
from train.cli.options import config_field, field_default
from train.collect import CollectConfig
from train.demo import DemoConfig
from train.evaluate import EvaluateConfig
from train.label import LabelConfig
from train.logratios import LogratiosConfig
from train.scorers import ScorerOptions
from train.settings import DPOSettings, TrainConfig

# The configs a command is the command line of: each of their fields needs an option. `sweep` and `stability` take
# a subset of the dual's options and `demo` is the embedded default (its seed and the rounds' step options alone).
OWN = {
    "collect": (CollectConfig,),
    "logratios": (LogratiosConfig,),
    "dual": (DualConfig,),
    "label": (LabelConfig,),
    "train": (TrainConfig, DPOSettings),
    "prealign": (TrainConfig, DPOSettings),
    "evaluate": (EvaluateConfig, ScorerOptions),
    "refine": (RefineConfig, DPOSettings, ScorerOptions),
    "sweep": (),
    "stability": (),
    "demo": (),
}
# Fields with no option of their own, and why.
INTERNAL = {
    (CollectConfig, "max_length"): "the sampled ids' log-probs are uncut (what was drawn): an API setting alone",
    (TrainConfig, "dpo"): "made of the DPOSettings options",
    (TrainConfig, "beta_override"): "--beta with --allow-beta-mismatch (can train), --beta (can prealign)",
    (TrainConfig, "beta"): "can prealign's --beta is the pairs' β (beta_override)",
    (TrainConfig, "extra_args"): "the `--name value` DPOConfig options after the command's own",
    (TrainConfig, "reference"): "a refine round's DPO reference, not a command-line choice",
    (EvaluateConfig, "scorer_options"): "made of the --scorer-* options",
    (RefineConfig, "dpo"): "made of the DPOSettings options",
    (RefineConfig, "scorer_options"): "made of the --scorer-* options",
    (DualConfig, "scores"): "the SCORES argument (no default)",
}
# Options whose default differs from their config field's on purpose.
DELIBERATE = {
    ("collect", "scorer"): "no scorer unless asked on the command line (a PeCAN collection may have none); the "
    "API's default is the demo's helpfulness",
    ("prealign", "out"): "a pre-alignment's own folder name (prealigned/), not a run's (can-run/)",
    ("prealign", "beta"): "required: a pre-alignment has no certificate to take β from",
}


def _commands():
    return typer.main.get_command(app).commands


def _same(cli, want):
    if isinstance(cli, Path):
        cli = str(cli)
    if cli is None and want == []:
        return True  # a repeatable option given no value
    return cli == want


def test_every_option_takes_its_default_from_its_config():
    problems, checked = [], 0
    for name, command in _commands().items():
        registered = getattr(command.callback, "can_configs", None)
        assert registered is not None, f"can {name}: its options take no defaults from a config (defaults_from)"
        configs, rename, filled = registered
        for param in command.params:
            f = config_field(configs, rename, param.name)
            if f is None or field_default(f) is dataclasses.MISSING or (name, param.name) in DELIBERATE:
                continue
            checked += 1
            if param.name not in filled:
                problems.append(f"can {name} --{param.name}: its default is written in the command, not taken "
                                f"from {f.name} (FROM_CONFIG)")  # fmt: skip
            elif not _same(param.default, field_default(f)):
                problems.append(f"can {name} --{param.name}: CLI default {param.default!r}, config "
                                f"{field_default(f)!r}")  # fmt: skip
    assert not problems, "\n".join(problems)
    assert checked >= 100


def test_every_field_of_a_commands_config_has_an_option():
    commands = _commands()
    assert set(OWN) == set(commands), "a command missing from OWN (or OWN naming none)"
    problems = []
    for name, own in OWN.items():
        configs, rename, _ = commands[name].callback.can_configs
        covered = set()
        for param in commands[name].params:
            f = config_field(configs, rename, param.name)
            if f is not None:
                target = rename.get(param.name, param.name)
                owner = target[0] if isinstance(target, tuple) else next(
                    c for c in configs if f.name in {g.name for g in dataclasses.fields(c)})  # fmt: skip
                covered.add((owner, f.name))
        for cfg in own:
            for f in dataclasses.fields(cfg):
                if (cfg, f.name) not in covered and (cfg, f.name) not in INTERNAL:
                    problems.append(f"can {name}: {cfg.__name__}.{f.name} has no option")
    assert not problems, "\n".join(problems)


def test_the_holder_test_sees_a_second_copy_and_a_missing_option():
    """The checks above fail where they should: a default written in the command, and a field without option."""
    from train.cli.options import FROM_CONFIG, defaults_from

    @dataclasses.dataclass
    class Cfg:
        k: int = 4
        seed: int = 0

    @defaults_from(Cfg)
    def cmd(k: int = 4, seed: int = FROM_CONFIG):
        pass

    configs, rename, filled = cmd.can_configs
    assert filled == {"seed"}  # k is a second copy: the walk above reports it
    assert config_field(configs, rename, "k").name == "k"
    assert config_field(configs, rename, "absent") is None
    import inspect

    assert inspect.signature(cmd).parameters["seed"].default == 0


def test_dpo_settings_refuse_bad_values_in_one_line():
    import pytest

    from can_jax.errors import CanError

    bad = (({"lr": 0.0}, "--lr"), ({"epochs": float("nan")}, "--epochs"), ({"batch_size": 0}, "--batch-size"),
           ({"precision": "fp8"}, "--precision"), ({"lora": True, "train_top": 2}, "--train-top"))  # fmt: skip
    for kw, msg in bad:
        with pytest.raises(CanError, match=msg):
            DPOSettings(**kw)
    assert DPOSettings(epochs=2, lr=1e-5).given() == {"num_train_epochs": 2, "learning_rate": 1e-5}


def test_demo_config_carries_its_dpo_options_once():
    cfg = DemoConfig()
    settings = cfg.dpo_settings()
    assert isinstance(settings, DPOSettings)
    assert settings.max_length == cfg.max_length and settings.seed == cfg.seed
    assert not {"epochs", "lr", "lora", "train_top", "batch_size"} & {f.name for f in dataclasses.fields(DemoConfig)}
