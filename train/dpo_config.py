"""The DPO configuration of a CAN run: TRL's `DPOConfig` with the options that would change what CAN optimises
refused (`CAN_FIXED`), precision chosen for the machine, and TRL's YAML/`--name value` conventions (`make_config`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import DPOConfig

from can_jax.errors import CanError


def bf16_available() -> bool:
    """bf16 autocast pays here: a CUDA GPU with bf16, or a CPU with native bf16 (AVX512-BF16/AMX via oneDNN), where
    it about halves a DPO step (docs/RESULTS.md, "bf16 on CPU")."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Options that would change what CAN optimises (DESIGN §4): one DPO with the Bradley–Terry (sigmoid) loss, KL weight β
# from the certificate, against the fixed π_ref. Each is refused with its reason.
CAN_FIXED = {
    "loss_type": (["sigmoid"], "the pseudo-preferences are Bradley–Terry labels of r + λ*ᵀg: the loss is sigmoid"),
    "loss_weights": (None, "a single sigmoid loss has no weights to set"),
    "label_smoothing": (0.0, "soft labels already carry the Bradley–Terry probability (use `can label --mode soft`)"),
    "ld_alpha": (None, "length-desensitised log-probs change the KL the dual priced"),
    "f_divergence_type": ("reverse_kl", "the dual prices the reverse KL(π ‖ π_ref)"),
    "use_weighting": (False, "per-pair weights change the population optimum away from π_λ*"),
    "sync_ref_model": (False, "the reference must stay π_ref: syncing it changes the KL the dual priced"),
}


@dataclass
class CanDPOConfig(DPOConfig):
    """TRL's DPOConfig — every training option users know (gradient accumulation, schedulers, warmup, report_to,
    DeepSpeed/FSDP through accelerate, …) — with the options that change CAN's objective refused (`CAN_FIXED`)."""

    # TRL names it gradient_checkpointing (default True); transformers 5 renamed it activation_checkpointing and warns
    # on the old name whenever the new one is unset. Unset here means: on under CUDA, off on a CPU, where it would
    # re-run the forward pass in backward for a memory saving the run does not need (docs/RESULTS.md, "Gradient
    # checkpointing on CPU"). Either name given by the user is honoured, without the warning.
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Alias of activation_checkpointing (TRL's name) [default: on under CUDA]."}
    )

    def __post_init__(self):
        chosen = self.gradient_checkpointing
        if hasattr(self, "activation_checkpointing"):
            if self.activation_checkpointing is None:
                self.activation_checkpointing = torch.cuda.is_available() if chosen is None else chosen
        elif chosen is None:
            self.gradient_checkpointing = torch.cuda.is_available()
        super().__post_init__()
        for name, (want, why) in CAN_FIXED.items():
            have = getattr(self, name)
            if name == "loss_weights" and have in (None, [1.0], [1]):
                continue
            if have != want:
                raise CanError(f"DPO option {name}={have!r} is not allowed: {why}")


from train.settings import LEARNING_RATE, LORA_LEARNING_RATE  # noqa: E402  (where the CLI reads them too)


def make_config(out_dir: str | Path, beta: float, precision: str = "auto", config_file: str | Path | None = None,
                extra_args: list[str] | tuple = (), lora: bool = False, **kw) -> CanDPOConfig:  # fmt: skip
    """The DPO configuration: this machine's defaults (CUDA when present, else CPU — TRL 1.x needs use_cpu —, bf16
    autocast where the hardware has it with precision "auto", or forced "bf16" / "fp32"), then a YAML/JSON
    `config_file` of DPOConfig fields, then `extra_args` (`--name value`, TRL's parser conventions), then `kw`."""
    if precision not in ("auto", "bf16", "fp32"):
        raise CanError(f"precision {precision!r}: use auto, bf16 or fp32")
    cuda = torch.cuda.is_available()
    bf16 = bf16_available() if precision == "auto" else precision == "bf16"
    defaults = dict(
        output_dir=str(out_dir),
        beta=beta,
        loss_type=["sigmoid"],
        use_cpu=not cuda,
        bf16=bf16,
        report_to=[],
        num_train_epochs=1.0,
        learning_rate=LORA_LEARNING_RATE if lora else LEARNING_RATE,
        per_device_train_batch_size=8,
        max_length=512,
        seed=0,
        # The reference log-probs are computed once before training (soft labels need them in the batch; the
        # others save a reference forward pass per step and epoch).
        precompute_ref_log_probs=True,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=2,
        logging_steps=5,
        remove_unused_columns=True,
        # DPO's step bar on a terminal (transformers hides it whenever its logging is quieter than WARNING, as `can`
        # makes it without --verbose); in a log file the metric lines alone.
        disable_tqdm=not sys.stderr.isatty(),
    )
    if config_file is None and not extra_args:
        return CanDPOConfig(**{**defaults, **kw})
    from trl import TrlParser

    if config_file is not None and not Path(config_file).is_file():
        raise CanError(f"DPO config file not found: {config_file}")
    parser = TrlParser(CanDPOConfig)
    parser.set_defaults(**defaults)
    argv = (["--config", str(config_file)] if config_file is not None else []) + list(extra_args)
    for key, value in kw.items():
        parser.set_defaults(**{key: value})  # explicit keywords win over the file: re-applied below
    import yaml

    try:
        cfg, rest = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise CanError(f"--config {config_file}: not a valid YAML/JSON file ({reason})") from None
    except OSError as err:
        from bridge.files import path_problem

        raise CanError(f"--config {config_file}: cannot read it ({path_problem(config_file, err)})") from None
    except SystemExit:
        raise CanError("invalid DPO option (argparse's message above); see `can train --help`") from None
    except (ValueError, TypeError) as err:  # e.g. a config file that is not a mapping, or a bad value
        raise CanError(f"DPO options: {err}") from None
    if rest:
        raise CanError(f"unknown DPO option(s) {rest}: options are DPOConfig fields, e.g. --warmup_steps 10")
    if kw:
        cfg = CanDPOConfig(**{**{f: getattr(cfg, f) for f in init_fields(cfg)}, **kw})
    return cfg


def check_config(args) -> None:
    """Refuses DPO settings that would crash inside torch/TRL or train nothing."""
    import math

    lr = args.learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise CanError(f"--lr (learning rate) must be a positive finite number, got {lr}")
    if args.max_steps is None or args.max_steps <= 0:
        epochs = args.num_train_epochs
        if not (math.isfinite(epochs) and epochs > 0):
            raise CanError(f"--epochs {epochs}: no training step would be taken; give a positive number of epochs "
                           "(or --max_steps N)")  # fmt: skip
    for name, option in (("per_device_train_batch_size", "--batch-size (per_device_train_batch_size)"),
                         ("gradient_accumulation_steps", "gradient_accumulation_steps")):  # fmt: skip
        if getattr(args, name) < 1:
            raise CanError(f"{option} must be at least 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 1:
        raise CanError(f"--max-length (max_length) must be at least 1 token, got {args.max_length}")


# The settings a run's checkpoints belong to: `--resume` continues them only under the same (epochs and max_steps
# may grow: continuing a run for longer is what resuming is for).


def init_fields(cfg) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cfg) if f.init]
