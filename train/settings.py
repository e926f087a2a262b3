"""The settings of the DPO stages — `DPOSettings` (the DPO options `can` takes itself) and `TrainConfig` (one run) —
importable without torch or TRL: the CLI builds its options from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from can_jax.errors import CanError

# The learning rate a run gets when none is given (--lr, --config or `--learning_rate`). A LoRA adapter starts at zero
# and moves the weights through a rank-16 product, so it needs a larger step than full fine-tuning to move the policy
# at all: 10× the full rate, the convention of TRL's DPO and PEFT examples (docs/RESULTS.md, "LoRA's learning rate").
LEARNING_RATE = 5e-6
LORA_LEARNING_RATE = 5e-5


def _short(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")  # 5e-6, as people write it


@dataclass(frozen=True)
class DPOSettings:
    """The DPO options `can` itself takes (`can train`, `can prealign`, the rounds of `can refine`, the demos); checked
    once, here. Unset (None) options come from --config, `--name value` or `make_config`'s defaults."""

    epochs: float | None = field(default=None, metadata={"help": "Epochs over the pairs [default: 1]."})
    lr: float | None = field(default=None, metadata={
        "help": f"Learning rate [default: {_short(LEARNING_RATE)}; {_short(LORA_LEARNING_RATE)} with --lora, whose "
        "adapter needs a larger step]."})  # fmt: skip
    batch_size: int | None = field(default=None, metadata={"help": "Pairs per device step [default: 8]."})
    max_length: int | None = field(default=None, metadata={
        "help": "Token limit of prompt + response (TRL truncation) [default: 512]."})  # fmt: skip
    lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    train_top: int | None = field(default=None, metadata={
        "help": "Train only the top N transformer blocks (faster on CPU; not with --lora)."})  # fmt: skip
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 autocast where the GPU or CPU has native bf16), bf16 or fp32."})  # fmt: skip
    seed: int | None = field(default=None, metadata={"help": "DPO seed [default: 0]."})

    def __post_init__(self):
        import math

        for name, flag in (("lr", "--lr"), ("epochs", "--epochs")):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise CanError(f"{flag} must be a positive number, got {v}")
        counts = (("batch_size", "--batch-size"), ("max_length", "--max-length"), ("train_top", "--train-top"))
        for name, flag in counts:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CanError(f"{flag} must be at least 1, got {v}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise CanError(f"--precision {self.precision!r}: use auto, bf16 or fp32")
        if self.train_top is not None and self.lora:
            raise CanError("--train-top and --lora are alternatives: choose one")

    def given(self) -> dict:
        """The DPOConfig fields these settings set (TRL's names), the unset ones left out."""
        trl = {"num_train_epochs": self.epochs, "learning_rate": self.lr,
               "per_device_train_batch_size": self.batch_size, "max_length": self.max_length,
               "seed": self.seed}  # fmt: skip
        return {k: v for k, v in trl.items() if v is not None}


@dataclass
class TrainConfig:
    """One DPO run (`can train`, and the DPO of the demos, pre-alignment and refine rounds). The DPO options are
    `dpo`; any other DPOConfig option comes from `config_file` (YAML/JSON) or `extra_args` (`--name value`), which
    `dpo`'s set options win over."""

    preferences: str  # a preference dataset written by `can label` (or pairs, with `beta_override`)
    policy: str = field(default="smollm2", metadata={
        "help": "Policy to align: a Transformers directory, or 'smollm2'."})  # fmt: skip
    out: str = field(default="can-run", metadata={"help": "Run folder (checkpoints/, policy/)."})
    dpo: DPOSettings = field(default_factory=DPOSettings)
    beta: float | None = field(default=None, metadata={
        "help": "Override β (must equal the certificate's unless --allow-beta-mismatch)."})  # fmt: skip
    beta_override: float | None = None  # replaces the certificate's β deliberately (pairs without one: their β)
    chat_template: bool | None = None
    resume: bool = field(default=False, metadata={
        "help": "Continue from the last checkpoint in OUT (same preferences, policy, settings)."})  # fmt: skip
    config_file: str | None = None
    extra_args: list = field(default_factory=list)
    overwrite: bool = False  # replace a finished run's policy in OUT (refine and the demo rerun theirs)
    reference: str | None = None  # a DPO reference other than the policy (a refine round continuing from the last)
