"""`can train`: one DPO run on the pseudo-preference dataset, through TRL (DESIGN §4, §5b).

bt and hard labels are ordinary preference pairs: TRL's sigmoid loss as is. Soft labels keep a per-pair target
p = P(chosen ≻ rejected), and the loss is −[p logσ(βΔ) + (1−p) logσ(−βΔ)] = −logσ(βΔ) + (1−p)·βΔ, i.e. TRL's own
sigmoid loss plus a term linear in the margin Δ of log-ratios. `CanDPOTrainer` adds that term through hook points
only: a collator that carries p, the signature columns that keep it, and a forward hook that captures the
per-token log-probs of TRL's single policy forward pass (reference log-probs are precomputed by TRL).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from can_jax.errors import CanError


@dataclass
class SoftPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, plus the per-pair soft target `p_chosen` when the examples carry one."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        if "p_chosen" in examples[0]:
            out["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples])
        return out


IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
# log π_ref of each side, recorded by `can collect` on the very ids of the pair (`can label` carries them).
STORED_REFS = ("logp_ref_chosen", "logp_ref_rejected")
# A stored value is used only if TRL's reference forward on a first batch reproduces it to this per token (plus
# 1e-3): float32 rounding differs by ~2e-5 per token (SmolLM2: ≤ 1e-3 over 48 tokens); bf16 autocast, another
# policy or another tokenisation differ by far more, and then TRL's own pass runs.
STORED_REF_TOL = 1e-4


@contextlib.contextmanager
def compact_lm_head(enabled: bool = True):
    """TRL's fused LM head scores only the completion positions on Triton devices and every position elsewhere (fixed
    tile shapes for compiling backends such as Neuron). Eager CPU and CUDA have nothing to recompile: there only the
    completion positions are scored — on the demo's batches (8 pairs, prompts ~40 of ~95 tokens) a CPU DPO step
    took 4.7 s instead of 6.9 s, with identical losses. Private coupling (`trl.trainer.utils._use_triton`, read
    by the fused head at each call; pinned by trl<2, tested in tests/train/test_dpo_refs.py). Not under
    `torch_compile`, where varying shapes would recompile."""
    import trl.trainer.utils as tu

    original = getattr(tu, "_use_triton", None)
    if original is None or not enabled:  # another TRL layout, or a compiled model: nothing to change
        yield
        return
    tu._use_triton = lambda device: device.type in ("cpu", "cuda") or original(device)
    try:
        yield
    finally:
        tu._use_triton = original


class CanDPOTrainer(DPOTrainer):
    """DPOTrainer with soft Bradley–Terry targets (used when the batch carries `p_chosen`), trained on the sampled
    token ids when the pairs carry them (`prompt_ids`, `chosen_ids`, `rejected_ids`: `train.tokens`)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # TRL 1.x always re-tokenises the text columns; pairs of sampled ids must be trained as they are (the ids
        # log π_ref was recorded on). Private hook, pinned by trl<2 and tested in tests/train/test_tokens_zoo.py.
        if not set(IDS) <= set(dataset.column_names):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            from train.dist import state

            # TRL's rule: a prompt that fills max_length leaves no completion token to learn from. The main
            # process writes the filter's cache file first; the others read it.
            with state().main_process_first():
                dataset = dataset.filter(lambda e: len(e["prompt_ids"]) < args.max_length)
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Private hook (pinned by trl<2, tested in tests/train/test_dpo_refs.py): with pairs of sampled ids whose
        # log π_ref `can collect` recorded, TRL's reference pass over the whole dataset (a third of the demo's DPO
        # stage) is replaced by those values, once a reference forward on a first batch reproduces them.
        stored = set(STORED_REFS) <= set(dataset.column_names)
        if stored and self._stored_refs_hold(dataset, batch_size):
            return dataset.rename_columns(dict(zip(STORED_REFS, ("ref_chosen_logps", "ref_rejected_logps"),
                                                   strict=True)))  # fmt: skip
        if stored:
            dataset = dataset.remove_columns(list(STORED_REFS))
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _stored_refs_hold(self, dataset, batch_size) -> bool:
        """Whether the stored reference log-probs are what TRL's reference forward computes for this trainer: the
        pairs are the sampled ids, none is cut, training runs in float32 on plain data parallelism (no
        DeepSpeed/FSDP engine, no tensor/context parallelism, no bf16/fp16 autocast), and TRL's own
        `compute_ref_log_probs` on the first batch agrees. Decided on the main process (a failure there counts as
        no), shared with all."""
        from accelerate.utils import broadcast_object_list

        ok = [False]
        if self.accelerator.is_main_process:
            try:
                ok[0] = self._stored_refs_check(dataset, batch_size)
            except Exception as err:  # noqa: BLE001 — any failure means TRL's own pass; the verdict must be shared
                import warnings

                warnings.warn(f"checking the recorded log π_ref failed ({type(err).__name__}: {err}): running TRL's "
                              "reference pass instead", stacklevel=2)  # fmt: skip
        broadcast_object_list(ok, from_process=0)
        return bool(ok[0])

    def _stored_refs_check(self, dataset, batch_size) -> bool:
        from torch.utils.data import DataLoader

        pc_cfg = getattr(self.accelerator, "parallelism_config", None)
        if (not set(IDS) <= set(dataset.column_names) or self.is_deepspeed_enabled or self.is_fsdp_enabled
                or pc_cfg is not None or self.args.bf16 or self.args.fp16):  # fmt: skip
            return False
        import pyarrow.compute as pc

        if len(dataset) == 0:
            return False
        t = dataset.select_columns(list(IDS)).with_format("arrow")[:]
        n = [pc.list_value_length(t[c]) for c in IDS]
        longest = pc.max(pc.add(n[0], pc.max_element_wise(n[1], n[2]))).as_py()
        limits = [m for m in (self.args.max_length, getattr(self.data_collator, "max_length", None)) if m is not None]
        if any(longest > m for m in limits):
            return False  # TRL cuts some pair: its log-prob is not the stored one's
        first = dataset.select(range(min(batch_size, len(dataset))))
        batch = next(iter(DataLoader(first, batch_size=len(first), collate_fn=self.data_collator)))
        batch.pop("p_chosen", None)
        batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            chosen, rejected = self.compute_ref_log_probs(self.ref_model or self.model, batch)
        stored = torch.tensor([first[STORED_REFS[0]], first[STORED_REFS[1]]], dtype=torch.float64)
        got = torch.stack([chosen, rejected]).double().cpu()
        tokens = torch.tensor([[len(c) for c in first["chosen_ids"]], [len(r) for r in first["rejected_ids"]]])
        gap = (got - stored).abs()
        if bool((gap <= STORED_REF_TOL * tokens + 1e-3).all()):
            return True
        import warnings

        warnings.warn(f"the log π_ref recorded by `can collect` differ from this trainer's reference forward by up to "
                      f"{float(gap.max()):.3g} nats per sequence (another policy than the one that collected, or "
                      "bf16/fp16 precision): running TRL's reference pass instead", stacklevel=2)  # fmt: skip
        return False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "p_chosen" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "p_chosen"]

    def compute_ref_log_probs(self, model, inputs):
        with compact_lm_head(not self.args.torch_compile):
            return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        with compact_lm_head(not self.args.torch_compile):
            return self._soft_loss(model, inputs, return_outputs)

    def _soft_loss(self, model, inputs, return_outputs):
        p = inputs.pop("p_chosen", None)
        if p is None:
            return super()._compute_loss(model, inputs, return_outputs)
        if "ref_chosen_logps" not in inputs:
            raise CanError("soft labels need precomputed reference log-probs (precompute_ref_log_probs=True)")
        captured = []
        handle = model.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            handle.remove()
        loss = result[0] if return_outputs else result
        seq_len = inputs["completion_mask"].size(1) - 1
        logps = captured[0].log_probs[:, -seq_len:].sum(dim=1)  # TRL's own per-sequence sums (ld_alpha unset)
        chosen, rejected = logps.chunk(2, dim=0)
        delta = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
        loss = loss + ((1.0 - p.to(delta.device)) * self.beta * delta).mean()
        return (loss, result[1]) if return_outputs else loss


def bf16_available() -> bool:
    """bf16 autocast pays here: a CUDA GPU with bf16, or a CPU with native bf16 (AVX512-BF16/AMX via oneDNN).

    Measured on a 2-core EPYC (SmolLM2-135M, 16 × 90 tokens): forward+backward 11.4 s fp32 → 5.5 s bf16 autocast.
    """
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

    def __post_init__(self):
        super().__post_init__()
        for name, (want, why) in CAN_FIXED.items():
            have = getattr(self, name)
            if name == "loss_weights" and have in (None, [1.0], [1]):
                continue
            if have != want:
                raise CanError(f"DPO option {name}={have!r} is not allowed: {why}")


def make_config(out_dir: str | Path, beta: float, precision: str = "auto", config_file: str | Path | None = None,
                extra_args: list[str] | tuple = (), **kw) -> CanDPOConfig:  # fmt: skip
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
        learning_rate=5e-6,
        per_device_train_batch_size=8,
        max_length=512,
        seed=0,
        # The reference log-probs are computed once before training (soft labels need them in the batch; the
        # others save a reference forward pass per step and epoch).
        precompute_ref_log_probs=True,
        # TRL defaults to gradient checkpointing, which re-runs the forward pass in backward: a memory saving a
        # CPU run does not need, at ~1.8× the step time (measured: 9.1 → 5.0 s per 8 SmolLM2 pairs).
        gradient_checkpointing=cuda,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=2,
        logging_steps=5,
        remove_unused_columns=True,
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
        reason = (err.strerror or type(err).__name__).lower()
        raise CanError(f"--config {config_file}: cannot read it ({reason})") from None
    except SystemExit:
        raise CanError("invalid DPO option (argparse's message above); see `can train --help`") from None
    except (ValueError, TypeError) as err:  # e.g. a config file that is not a mapping, or a bad value
        raise CanError(f"DPO options: {err}") from None
    if rest:
        raise CanError(f"unknown DPO option(s) {rest}: options are DPOConfig fields, e.g. --warmup_steps 10")
    if kw:
        cfg = CanDPOConfig(**{**{f: getattr(cfg, f) for f in _init_fields(cfg)}, **kw})
    return cfg


def check_config(args) -> None:
    """Refuses DPO settings that would crash inside torch/TRL or train nothing (issue 23)."""
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
RUN_SETTINGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed",
                "beta", "bf16", "lr_scheduler_type", "weight_decay", "truncation_mode")  # fmt: skip
RUN_RECORD = "run.json"


def _content_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's files (names and contents)."""
    import hashlib

    from bridge.files import sha256_file

    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def run_record(preferences: Path, prefs, policy: str, args, **choices) -> dict:
    """What a run's checkpoints belong to: the preference set (content hash), its certificate, the policy and the
    training settings."""
    settings = {k: getattr(args, k) for k in RUN_SETTINGS}
    settings = {k: v if isinstance(v, (int, float, bool, str, type(None))) else str(v) for k, v in settings.items()}
    return {"preferences": str(preferences), "preferences_sha256": _content_sha256(Path(preferences)),
            "certificate_hash": None if prefs.certificate is None else prefs.certificate.sha256,
            "policy": str(policy), "settings": {**settings, **choices}}  # fmt: skip


def _check_run_folder(out_dir: Path, record: dict, resume: bool, overwrite: bool) -> bool:
    """Whether to resume from OUT's checkpoints. Refuses to overwrite a finished run's policy or an unfinished run's
    checkpoints without `overwrite`, and `resume` onto checkpoints of another preference set, policy or settings."""
    import json

    ckpts = out_dir / "checkpoints"
    if out_dir.exists() and not out_dir.is_dir():
        from can_jax.errors import OutputError

        raise OutputError(f"cannot write {out_dir}: a file is in the way")
    has_ckpt = ckpts.is_dir() and any(ckpts.glob("checkpoint-*"))
    finished = (out_dir / "policy").exists()
    if resume and has_ckpt:
        try:
            old = json.loads((out_dir / RUN_RECORD).read_text())
        except FileNotFoundError:
            import warnings

            warnings.warn(f"{out_dir} records no run for its checkpoints (written by an older can): resuming them "
                          "unchecked", stacklevel=3)  # fmt: skip
            return True
        except (OSError, ValueError) as err:
            raise CanError(f"{out_dir / RUN_RECORD}: unreadable ({err}): --overwrite to start over") from None
        if old.get("preferences_sha256") != record["preferences_sha256"] or (
            old.get("certificate_hash") != record["certificate_hash"]
        ):
            raise CanError(f"--resume: the checkpoints in {ckpts} were trained on another preference set "
                           f"({old.get('preferences')}): resume with that set, or --overwrite to start "
                           "over")  # fmt: skip
        if old.get("policy") != record["policy"]:
            raise CanError(f"--resume: the checkpoints in {ckpts} are of policy {old.get('policy')!r}, not "
                           f"{record['policy']!r}: resume with it, or --overwrite to start over")  # fmt: skip
        was, now = old.get("settings", {}), record["settings"]
        diff = [f"{k} {now.get(k)!r} here, {was.get(k)!r} there" for k in sorted(set(was) | set(now))
                if was.get(k) != now.get(k)]  # fmt: skip
        if diff:
            raise CanError(f"--resume: the checkpoints in {ckpts} were trained with other settings "
                           f"({'; '.join(diff)}): resume with that run's settings, or --overwrite to start "
                           "over")  # fmt: skip
        return True
    if (finished or has_ckpt) and not overwrite:
        if finished:
            raise CanError(f"{out_dir / 'policy'} holds the policy of a finished run: --overwrite to replace it "
                           "(--resume to continue that run), or another --out")  # fmt: skip
        raise CanError(f"{ckpts} holds checkpoints of an unfinished run: --resume to continue it, or --overwrite to "
                       "start over")  # fmt: skip
    return False


def _init_fields(cfg) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cfg) if f.init]


def train_top_layers(model, n: int) -> None:
    """Freezes the embeddings and all but the top N transformer blocks (the final norm and an untied head stay
    trainable): backward stops at block L − N, which halves a CPU step for N = 6 of SmolLM2's 30 blocks."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None or n < 1:
        raise CanError("--train-top needs a decoder with model.layers (LLaMA-like) and N ≥ 1")
    model.get_input_embeddings().requires_grad_(False)
    for i, block in enumerate(blocks):
        block.requires_grad_(i >= len(blocks) - n)


def load_preferences(path: str | Path, beta: float | None = None):
    """(datasets.Dataset, PreferenceSet) from a preference dataset.

    A `can label` output — Parquet, or a `datasets` directory — carries its certificate (checked against the hash
    it was labelled with): β and λ* come from it. Any other preference table (Parquet, JSON Lines, CSV or a
    `datasets` directory with prompt, chosen, rejected — TRL's standard format, e.g. a human-labelled dataset for
    `can prealign`) is read as hard labels, and then `beta` must be given. The set's `table` holds no rows (the
    Dataset does).
    """
    from datasets import Dataset

    from bridge.preferences import PreferenceSet
    from bridge.tables import read_table

    path = Path(path)
    if not path.exists():
        raise CanError(f"preference dataset not found: {path}")
    record, cert = PreferenceSet.read_metadata(path)
    if path.is_dir():
        from datasets import load_from_disk

        try:
            table = load_from_disk(str(path)).with_format("arrow")[:]
        except (FileNotFoundError, ValueError) as err:
            raise CanError(f"{path}: not a `datasets` directory ({err})") from None
    else:
        table = read_table(path)
    if cert is None and beta is None:
        raise CanError(f"{path} was not written by `can label` (it carries no certificate): give the DPO β")
    prefs = PreferenceSet(table.schema.empty_table(), record, cert)
    keep = ["prompt", "chosen", "rejected"] + (["p_chosen"] if prefs.mode == "soft" else [])
    if set(IDS) <= set(table.column_names):
        keep += list(IDS)  # sampled ids: trained as they are
        if set(STORED_REFS) <= set(table.column_names):
            keep += list(STORED_REFS)  # their log π_ref, recorded by `can collect`
    missing = [c for c in keep if c not in table.column_names]
    if missing:
        raise CanError(f"{path}: missing column(s) {missing}; a preference table has prompt, chosen, rejected")
    if table.num_rows == 0:
        raise CanError(f"{path}: no preference pairs")
    return Dataset.from_dict({c: table.column(c).to_pylist() for c in keep}), prefs


def _apply_chat_template(data, tok, policy: str, chat_template: bool | None):
    """Text pairs as TRL should see them, by the rule of `can collect` (train.tokens): with a chat template, raw
    instructions become one-turn conversations (the template then applied once, as ids). `chat_template` None
    (auto): when the policy has a template; True: required; False: text as written. Pairs carrying sampled ids
    are trained as they are."""
    from train.tokens import completion_of, has_template, is_conversation

    if set(IDS) <= set(data.column_names) or chat_template is False:
        if chat_template and set(IDS) <= set(data.column_names):
            raise CanError("--chat-template is for text pairs; these pairs carry their sampled token ids already")
        return data
    if not has_template(tok):
        if chat_template:
            raise CanError(f"--chat-template: the tokenizer of {policy!r} has no chat template")
        return data
    conv = [is_conversation(p) for p in data["prompt"]]
    if any(conv) and not all(conv):
        raise CanError("the preference table mixes text and conversational prompts")
    if all(conv):
        return data
    from datasets import Dataset

    cols = data.to_dict()
    cols["prompt"] = [[{"role": "user", "content": p}] for p in cols["prompt"]]
    for side in ("chosen", "rejected"):
        cols[side] = [completion_of(p, c) for p, c in zip(cols["prompt"], cols[side], strict=True)]
    return Dataset.from_dict(cols)


def _shared_on_disk(data, folder: Path):
    """The dataset saved once (main process) under the run folder and memory-mapped by every process, so that the
    cache files TRL's preprocessing and reference pass write are shared by the ranks (an in-memory dataset gets a
    private temporary cache per process, which the other ranks cannot open)."""
    import shutil

    from datasets import load_from_disk

    from train.dist import state

    st = state()
    if st.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        data.save_to_disk(str(tmp))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    st.wait_for_everyone()
    return load_from_disk(str(folder))


def train(
    preferences: str | Path,
    policy: str,
    out_dir: str | Path,
    beta: float | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    lora: bool = False,
    train_top: int | None = None,
    precision: str = "auto",
    chat_template: bool | None = None,
    resume: bool = False,
    seed: int | None = None,
    beta_override: float | None = None,
    config_file: str | Path | None = None,
    extra_args: list[str] | tuple = (),
    overwrite: bool = True,
    **config_kw,
) -> Path:
    """Runs DPO with β from the preference dataset's certificate; returns the directory of the aligned policy.

    `beta` must equal the certificate's β (a consistency check); `beta_override` replaces it deliberately.
    `train_top` trains only the top N blocks (see `train_top_layers`); `precision` is auto, bf16 or fp32;
    `chat_template` renders raw prompts through the policy's chat template first. `config_file` (YAML/JSON) and
    `extra_args` set any other DPOConfig option (`make_config`); the explicit arguments here win over both.
    Under `accelerate launch` TRL trains with DDP (or DeepSpeed/FSDP per the accelerate config); only the main
    process writes the policy, tokenizer and records.

    OUT records what its checkpoints belong to (`run.json`: the preference set, its certificate, the policy, the
    settings); `resume` continues them only under the same. A finished run's policy, or an unfinished run's
    checkpoints, are replaced only with `overwrite` (the CLI's default is False; the old checkpoints are then
    removed so that the two runs do not mix).
    """
    import json
    import shutil

    from bridge.files import atomic_write_text
    from train.collect import ensure_dir
    from train.dist import state
    from train.models import load_policy

    data, prefs = load_preferences(preferences, beta_override if beta_override is not None else beta)
    cert_beta = prefs.beta if prefs.beta is not None else beta  # a plain table: the β given
    if beta_override is not None:
        beta = cert_beta = beta_override
    if beta is not None and abs(beta - cert_beta) > 1e-12 * max(1.0, abs(beta)):
        raise CanError(
            f"--beta {beta} differs from the certificate's β = {cert_beta}: the dual and DPO must use the same β "
            "(DESIGN §4); drop --beta, or pass --allow-beta-mismatch"
        )
    out_dir = Path(out_dir)
    given = {"num_train_epochs": epochs, "learning_rate": lr, "per_device_train_batch_size": batch_size,
             "max_length": max_length, "seed": seed}  # fmt: skip
    # Every setting is parsed and checked before the run folder is touched or a model loaded.
    args = make_config(out_dir / "checkpoints", cert_beta if beta is None else beta, precision, config_file,
                       extra_args, **{k: v for k, v in given.items() if v is not None}, **config_kw)  # fmt: skip
    check_config(args)
    if train_top is not None:
        if lora:
            raise CanError("--train-top and --lora are alternatives: choose one")
        if train_top < 1:
            raise CanError(f"--train-top must be at least 1, got {train_top}")
    record = run_record(Path(preferences), prefs, policy, args, lora=lora, train_top=train_top,
                        chat_template=chat_template)  # fmt: skip
    st = state()
    has_ckpt = _check_run_folder(out_dir, record, resume, overwrite)
    if st.is_main_process:
        ensure_dir(out_dir)  # a path that cannot be a folder is refused before the model is loaded
    model, tok = load_policy(policy)
    if set(IDS) <= set(data.column_names) and prefs.tokenizer_sha256:
        from train.tokens import tokenizer_fingerprint

        if tokenizer_fingerprint(tok) != prefs.tokenizer_sha256:
            raise CanError(f"the pairs carry token ids sampled with another tokenizer than {policy!r}'s: train the "
                           "policy they were collected from")  # fmt: skip
    data = _apply_chat_template(data, tok, policy, chat_template)
    if train_top is not None:
        train_top_layers(model, train_top)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    st.wait_for_everyone()  # every rank has looked at OUT before the main process changes it
    if st.is_main_process:
        if not has_ckpt:
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # another run's: never mixed with this one
        atomic_write_text(out_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")
    data = _shared_on_disk(data, out_dir / "data")
    if prefs.mode == "soft" and not args.precompute_ref_log_probs:
        raise CanError("DPO option precompute_ref_log_probs=False is not allowed with soft labels: the soft-label "
                       "term needs the reference log-probs in the batch")  # fmt: skip
    intended = cert_beta if beta is None else beta
    if abs(args.beta - intended) > 1e-12 * max(1.0, abs(intended)):
        raise CanError(
            f"DPO option beta={args.beta} differs from the certificate's β = {intended}: the dual and DPO must "
            "use the same β (DESIGN §4); drop it, or use --beta with --allow-beta-mismatch"
        )
    max_length = args.max_length
    if max_length is not None and set(IDS) <= set(data.column_names):
        import warnings

        longest = [len(p) + max(len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                     data["rejected_ids"], strict=True)]  # fmt: skip
        cut = sum(n > max_length for n in longest)
        if cut:
            warnings.warn(f"{cut} of {len(longest)} pairs are longer than max_length={max_length} tokens: DPO trains "
                          "their first max_length tokens, not the whole sampled response (raise --max-length)",
                          stacklevel=2)  # fmt: skip
    collator = SoftPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=max_length,
                                      truncation_mode=args.truncation_mode,
                                      pad_to_multiple_of=args.pad_to_multiple_of)  # fmt: skip
    # ref_model=None: the reference is the policy as loaded (TRL reloads it from its path; with LoRA, the base
    # model with the adapter disabled). Soft labels precompute its log-probs once.
    trainer = CanDPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok,
                            data_collator=collator, peft_config=peft_config)  # fmt: skip
    trainer.train(resume_from_checkpoint=True if has_ckpt else None)
    final = out_dir / "policy"
    if lora:
        # Merge the adapter into the base weights: the aligned policy is a standalone model directory that
        # `can evaluate`, `can collect` and a GPU job load like any other.
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(str(final))
    else:
        trainer.save_model(str(final))  # main process only (TRL/Trainer's rule; gathers ZeRO-3/FSDP shards)
    if trainer.accelerator.is_main_process:
        tok.save_pretrained(final)
        _write_card(final, prefs, policy, preferences, args)
    trainer.accelerator.wait_for_everyone()
    return final


def _write_card(final: Path, prefs, policy: str, preferences, args) -> None:
    """The model card (README.md) and a copy of the certificate beside the aligned weights (`can evaluate` reads
    it from there)."""
    from bridge.certificate import write_beside
    from bridge.files import atomic_write_text
    from train.card import model_card

    record = {**prefs.record, "dataset": str(preferences)}
    keys = (
        "beta",
        "learning_rate",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "seed",
    )
    settings = {k: getattr(args, k) for k in keys}
    atomic_write_text(final / "README.md", model_card(prefs.certificate, record, policy, settings))
    if prefs.certificate is not None:
        write_beside(final, prefs.certificate)


def prealign(preferences: str | Path, policy: str, out_dir: str | Path, beta: float, **train_kw) -> Path:
    """PeCAN's pre-alignment (DESIGN §3): DPO of the reference policy on one preference dataset with KL weight β.

    Writes the aligned policy to OUT/policy with `prealign.json` beside its weights (β, the reference it was
    aligned from, the dataset's hash), which `can collect --aligned NAME=OUT/policy` reads β from.
    """
    import json

    from bridge.files import atomic_write_text, sha256_file
    from train.collect import PREALIGN_FILE
    from train.models import resolve_policy

    if not beta > 0:
        raise CanError(f"--beta must be positive, got {beta}")
    final = train(preferences, policy, out_dir, beta_override=beta, **train_kw)
    from train.dist import state

    if not state().is_main_process:
        return final
    record = {"beta": beta, "reference": resolve_policy(policy), "preferences": str(preferences),
              "preferences_sha256": sha256_file(preferences)}  # fmt: skip
    atomic_write_text(final / PREALIGN_FILE, json.dumps(record, indent=2) + "\n")
    return final
