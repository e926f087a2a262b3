"""The one sequence log-probability of the project, computed exactly as TRL's DPO computes it (DESIGN §3, §5b).

log π(y|x) = Σ over completion tokens of log p(token | prefix), where the completion starts where the tokenized
prompt and the tokenized prompt+completion diverge (TRL's rule: BOS, chat templates and merges across the boundary
are handled the same way), a text completion gets the tokenizer's EOS appended unless it already ends with it (as
TRL's preprocessing does; conversational completions get the chat template's end instead), and sequences are
truncated to `max_length` like TRL's collator. PeCAN's log-ratios, collection's log π_ref and evaluation all go
through `sequence_logps`.
"""

from __future__ import annotations

import torch


def tokenize_completion(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) split as TRL's DPO preprocessing splits them. Prompt and completion are both
    strings, or both conversational (lists of {"role", "content"} messages)."""
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(prompt, list):
        prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_ids = _tokenize(tokenizer, prompt + completion)["input_ids"]
    else:
        if tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full_ids = _tokenize(tokenizer, prompt + completion)["input_ids"]
    n = common_prefix_length(prompt_ids, full_ids)
    return prompt_ids[:n], full_ids[n:]


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: list,
    completions: list,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
) -> torch.Tensor:
    """[n] float32 summed completion log-probs log π(completion | prompt), batched, on the model's device."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length, truncation_mode=truncation_mode)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        examples = []
        for p, c in zip(prompts[i : i + batch_size], completions[i : i + batch_size], strict=True):
            p_ids, c_ids = tokenize_completion(tokenizer, p, c)
            examples.append({"prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": c_ids})
        batch = collate(examples)
        half = len(examples)  # the collator stacks [chosen; rejected]: the first half is ours
        ids = batch["input_ids"][:half].to(device)
        attn = batch["attention_mask"][:half].to(device)
        mask = batch["completion_mask"][:half].to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        out.append((token_logps * mask[:, 1:]).sum(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0)
