"""`CanDPOTrainer`: TRL's DPOTrainer extended through its hooks (DESIGN §4, §6) — soft labels, the sampled ids,
the log π_ref recorded at collection, and the compact fused LM head.

bt and hard labels are ordinary preference pairs: TRL's sigmoid loss as is. Soft labels keep a per-pair target
p = P(chosen ≻ rejected), and the loss is −[p logσ(βΔ) + (1−p) logσ(−βΔ)] = −logσ(βΔ) + (1−p)·βΔ, i.e. TRL's own
sigmoid loss plus a term linear in the margin Δ of log-ratios. `CanDPOTrainer` adds that term through hook points
only: a collator that carries p, the signature columns that keep it, and a forward hook that captures the
per-token log-probs of TRL's single policy forward pass (reference log-probs are precomputed: recorded at
collection, or TRL's reference forward once per distinct response).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from trl import DPOTrainer
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


def metric_line(logs: dict) -> str:
    """A Trainer log as TRL prints it — `{'loss': 0.6931, 'rewards/margins': 2.575e-05, …}` — with the numbers as
    numbers (4 significant digits), not transformers 5's dict of strings; `total_flos` left out."""
    import math

    def number(v):
        if isinstance(v, float) and math.isfinite(v):
            return float(f"{v:.4g}")
        return v

    return str({k: number(v) for k, v in logs.items() if k != "total_flos"})


def _metric_callbacks():
    """Transformers' progress bar and printer, each with its log line replaced by `metric_line`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class MetricProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and logs:
                self.training_bar.write(metric_line(logs))

    class MetricPrinter(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_local_process_zero and logs:
                print(metric_line(logs))

    return {ProgressCallback: MetricProgress, PrinterCallback: MetricPrinter}


def prompt_fits(prompt_ids, max_length: int) -> bool:
    """Whether a pair keeps a response token under keep_start truncation at `max_length` (TRL's rule: a prompt that
    fills max_length leaves no completion token to learn from)."""
    return len(prompt_ids) < max_length


class CanDPOTrainer(DPOTrainer):
    """DPOTrainer with soft Bradley–Terry targets (used when the batch carries `p_chosen`), trained on the sampled
    token ids when the pairs carry them (`prompt_ids`, `chosen_ids`, `rejected_ids`: `train.tokens`). Its metric
    lines print numbers (`metric_line`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for old, new in _metric_callbacks().items():
            if self.pop_callback(old) is not None:
                self.add_callback(new)

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
                limit = args.max_length
                dataset = dataset.filter(lambda e: prompt_fits(e["prompt_ids"], limit))
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Private hook (pinned by trl<2, tested in tests/train/test_dpo_refs.py): with pairs of sampled ids whose
        # log π_ref `can collect` recorded, TRL's reference pass over the whole dataset (a third of the demo's DPO
        # stage) is replaced by those values, once a reference forward on a first batch reproduces them. Otherwise
        # the reference forward runs once per distinct response, not per pair side.
        stored = set(STORED_REFS) <= set(dataset.column_names)
        if stored and self._stored_refs_hold(dataset, batch_size):
            return dataset.rename_columns(dict(zip(STORED_REFS, ("ref_chosen_logps", "ref_rejected_logps"),
                                                   strict=True)))  # fmt: skip
        if stored:
            dataset = dataset.remove_columns(list(STORED_REFS))
        return self._distinct_ref_logps(dataset, name, batch_size)

    def _distinct_ref_logps(self, dataset, name, batch_size):
        """TRL's reference forward (`compute_ref_log_probs`: this trainer's precision, autocast and adapters) once per
        distinct (prompt ids, response ids), mapped to the pairs. Pairs built from K samples of a prompt repeat each
        response several times (the demo: 12 pairs from 8 samples, each response ~3 times). The forward takes
        pairs that share a prompt, so the distinct responses of each prompt go two by two (an odd one twice)."""
        from datasets import Dataset, IterableDataset

        if (isinstance(dataset, IterableDataset) or not set(IDS) <= set(dataset.column_names)
                or self.is_deepspeed_enabled or len(dataset) == 0):  # fmt: skip
            return super()._precompute_ref_logps(dataset, name, batch_size)
        import numpy as np
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        cols = dataset.select_columns(list(IDS)).to_dict()
        seen: dict[tuple, int] = {}  # (prompt ids, response ids) -> its slot
        sides = np.empty((len(dataset), 2), np.int64)
        for i, (prompt, *responses) in enumerate(zip(*(cols[c] for c in IDS), strict=True)):
            key = tuple(prompt)
            for side, response in enumerate(responses):
                sides[i, side] = seen.setdefault((key, tuple(response)), len(seen))
        by_prompt: dict[tuple, list] = {}
        for (key, response), slot in seen.items():
            by_prompt.setdefault(key, []).append((list(response), slot))
        rows, slots = [], []
        for key, items in by_prompt.items():
            items.sort(key=lambda item: len(item[0]))
            items = items + items[-1:] if len(items) % 2 else items
            for (a, sa), (b, sb) in zip(items[::2], items[1::2], strict=True):
                rows.append({"prompt_ids": list(key), "chosen_ids": a, "rejected_ids": b})
                slots.append((sa, sb))
        order = sorted(range(len(rows)), key=lambda j: len(rows[j]["prompt_ids"]) + max(
            len(rows[j]["chosen_ids"]), len(rows[j]["rejected_ids"])))  # like lengths batched: less padding
        loader = self.accelerator.prepare(DataLoader(Dataset.from_list([rows[j] for j in order]),
                                                     batch_size=batch_size, collate_fn=self.data_collator))
        model = self.ref_model or self.model
        got = []
        for batch in tqdm(loader, desc=f"Reference log-probs of {len(seen)} distinct responses ({name})",
                          disable=bool(os.environ.get("TQDM_DISABLE", "")) or not self.accelerator.is_main_process):
            chosen, rejected = self.compute_ref_log_probs(model, batch)
            got.append(torch.stack(self.accelerator.gather_for_metrics((chosen, rejected)), 1).double().cpu())
        value = np.empty(len(seen))
        value[np.asarray(slots)[order]] = torch.cat(got).numpy()
        return dataset.add_column("ref_chosen_logps", value[sides[:, 0]].tolist()).add_column(
            "ref_rejected_logps", value[sides[:, 1]].tolist())

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
