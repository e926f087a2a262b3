"""`can train`: one DPO run on the pseudo-preference dataset, through TRL (DESIGN §4, §6) — the run itself:
reading the preference set, the policy, the trainer (`train.trainer`: soft labels, sampled ids, recorded log π_ref),
the config (`train.dpo_config`), the run record (`train.run_record`), the model card and the certificate beside the
weights. `prealign` is PeCAN's DPO of π_ref on one aspect's preferences.
"""

from __future__ import annotations

from pathlib import Path

from can_jax.errors import CanError
from train.dpo_config import check_config, make_config  # noqa: F401
from train.run_record import RUN_RECORD, check_run_folder, is_run_folder, run_record  # noqa: F401
from train.settings import DPOSettings, TrainConfig  # noqa: F401  (the stage's settings)
from train.trainer import (  # noqa: F401  (the trainer's names, where callers have always found them)
    IDS,
    STORED_REFS,
    CanDPOTrainer,
    SoftPreferenceCollator,
    compact_lm_head,
    prompt_fits,
)


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


RUN_ENTRIES = ("checkpoints", "data", "data.tmp", "policy", RUN_RECORD)


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


def run(cfg: TrainConfig) -> Path:
    """Runs DPO with β from the preference dataset's certificate (`TrainConfig`); returns the directory of the
    aligned policy. Under `accelerate launch` TRL trains with DDP (or DeepSpeed/FSDP per the accelerate config);
    only the main process writes the policy, tokenizer and records.

    OUT records what its checkpoints belong to (`run.json`: the preference set, its certificate, the policy, the
    settings); `resume` continues them only under the same. A finished run's policy, or an unfinished run's
    checkpoints, are replaced only with `overwrite` (the old checkpoints are then removed so two runs do not mix).
    """
    import json
    import shutil

    from bridge.files import atomic_write_text, honour_umask, spelled
    from bridge.owned import check_not_inputs
    from train.dist import claim, state
    from train.models import load_policy

    preferences, policy, out_dir, reference = cfg.preferences, cfg.policy, Path(cfg.out), cfg.reference
    beta, beta_override, precision = cfg.beta, cfg.beta_override, cfg.dpo.precision
    lora, train_top, config_file, extra_args = cfg.dpo.lora, cfg.dpo.train_top, cfg.config_file, cfg.extra_args
    chat_template = cfg.chat_template
    data, prefs = load_preferences(preferences, beta_override if beta_override is not None else beta)
    cert_beta = prefs.beta if prefs.beta is not None else beta  # a plain table: the β given
    if beta_override is not None:
        beta = cert_beta = beta_override
    if beta is not None and abs(beta - cert_beta) > 1e-12 * max(1.0, abs(beta)):
        raise CanError(
            f"--beta {beta} differs from the certificate's β = {cert_beta}: the dual and DPO must use the same β "
            "(DESIGN §4); drop --beta, or pass --allow-beta-mismatch"
        )
    # Every setting is parsed and checked before the run folder is touched or a model loaded (`cfg.dpo` checked
    # itself; what a config file or `--name value` adds is checked here).
    args = make_config(out_dir / "checkpoints", cert_beta if beta is None else beta, precision, config_file,
                       extra_args, lora=lora, **cfg.dpo.given())  # fmt: skip
    check_config(args)
    if reference is not None and lora:
        raise CanError("a separate DPO reference does not go with --lora (the adapter's base is the reference)")
    record = run_record(Path(preferences), prefs, policy, args, lora=lora, train_top=train_top,
                        chat_template=chat_template,
                        **({"reference": spelled(reference)} if reference else {}))  # fmt: skip
    st = state()
    record["processes"] = st.num_processes  # what the run was launched on (not a setting: resume may differ)
    has_ckpt = check_run_folder(out_dir, record, cfg.resume, cfg.overwrite)
    # What this run replaces or cleans: only entries a `can` run made (never a user's own `data/` in --out), and
    # never one of its own inputs (a policy trained from OUT/policy into OUT).
    entries = [("--out", out_dir / name) for name in RUN_ENTRIES]
    check_not_inputs(entries, [("PREFERENCES", preferences), ("--policy", policy), ("--reference", reference),
                               ("--config", config_file)])  # fmt: skip
    claim(st, out_dir, list(RUN_ENTRIES), legacy=is_run_folder)
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
        # keep_start drops a pair whose prompt fills max_length (`train.trainer.prompt_fits`); keep_end keeps it.
        keep_start = args.truncation_mode == "keep_start"
        fits = [prompt_fits(p, max_length) or not keep_start for p in data["prompt_ids"]]
        if not any(fits):
            raise CanError(f"--max-length {max_length} leaves no response token of any pair: every prompt is at "
                           f"least that long (the shortest has {min(map(len, data['prompt_ids']))} tokens); raise "
                           "--max-length")  # fmt: skip
        cut = sum(n > max_length and ok for n, ok in zip(longest, fits, strict=True))
        if cut:
            warnings.warn(f"{cut} of {len(longest)} pairs are longer than max_length={max_length} tokens: DPO trains "
                          "their first max_length tokens, not the whole sampled response (raise --max-length)",
                          stacklevel=2)  # fmt: skip
    collator = SoftPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=max_length,
                                      truncation_mode=args.truncation_mode,
                                      pad_to_multiple_of=args.pad_to_multiple_of)  # fmt: skip
    # ref_model=None: the reference is the policy as loaded (TRL reloads it from its path; with LoRA, the base
    # model with the adapter disabled). Soft labels precompute its log-probs once.
    ref_model = None
    if reference is not None:
        ref_model = load_policy(reference)[0].eval()
        ref_model.requires_grad_(False)
    trainer = CanDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok,
                            data_collator=collator, peft_config=peft_config)  # fmt: skip
    _count_dropped(trainer, len(data), max_length, out_dir / RUN_RECORD, record, st.is_main_process)
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
        for entry in (final, out_dir / "checkpoints"):  # this run's own entries, never the rest of --out
            honour_umask(entry)
    trainer.accelerator.wait_for_everyone()
    return final


def _count_dropped(trainer, given: int, max_length, record_path: Path, record: dict, main: bool) -> None:
    """Pairs the trainer dropped (a prompt that fills --max-length leaves no response token to learn from) are
    counted in run.json and said in a warning; none left is an error, not an empty run."""
    import json
    import warnings

    from bridge.files import atomic_write_text

    kept = len(trainer.train_dataset)
    if kept == 0:
        raise CanError(f"no pair is left to train on: every prompt fills --max-length {max_length}; raise "
                       "--max-length")  # fmt: skip
    record["pairs"] = {"given": given, "trained": kept, "dropped_prompt_fills_max_length": given - kept}
    if main:
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    if kept < given and main:
        warnings.warn(f"{given - kept} of {given} pairs dropped: their prompt fills --max-length {max_length}, "
                      "leaving no response token (counted in run.json; raise --max-length to keep them)",
                      stacklevel=2)  # fmt: skip


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


def prealign(cfg: TrainConfig) -> Path:
    """PeCAN's pre-alignment (DESIGN §3): DPO of the reference policy `cfg.policy` on one preference dataset with
    KL weight β = `cfg.beta_override` (pairs carry no certificate).

    Writes the aligned policy to OUT/policy with `prealign.json` beside its weights (β, the reference it was
    aligned from, the dataset's hash), which `can collect --aligned NAME=OUT/policy` reads β from.
    """
    import json

    from bridge.files import atomic_write_text, sha256_file
    from train.logratios import PREALIGN_FILE
    from train.models import resolve_policy

    beta, policy, preferences = cfg.beta_override, cfg.policy, cfg.preferences
    if beta is None or not beta > 0:
        raise CanError(f"--beta must be positive, got {beta}")
    final = run(cfg)
    from train.dist import state

    if not state().is_main_process:
        return final
    record = {"beta": beta, "reference": resolve_policy(policy), "preferences": str(preferences),
              "preferences_sha256": sha256_file(preferences)}  # fmt: skip
    atomic_write_text(final / PREALIGN_FILE, json.dumps(record, indent=2) + "\n")
    return final
