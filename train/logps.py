"""The one sequence log-probability of the project, computed exactly as TRL's DPO computes it (DESIGN §3, §6).

log π(y|x) = Σ over completion tokens of log p(token | prefix), where the completion starts where the tokenized
prompt and the tokenized prompt+completion diverge (TRL's rule: BOS, chat templates and merges across the boundary
are handled the same way), a text completion gets the tokenizer's EOS appended unless it already ends with it (as
TRL's preprocessing does; conversational completions get the chat template's end instead), and sequences are
truncated to `max_length` like TRL's collator. Pairs of sampled ids (`train.tokens`) are taken as they are: that is
what `can train` trains on. PeCAN's log-ratios, collection's log π_ref and evaluation all go through
`logps_and_kl`.

Memory: no `[batch, length, vocab]` tensor is made. The model runs up to its final hidden states, only
the positions that predict a completion token are kept, and the LM head (in float32), log-softmax and gather run
over blocks of those positions whose `[rows, V]` float32 logits fit `CHUNK_BYTES`: the full-vocabulary working set
is a few such blocks whatever the vocabulary size.
"""

from __future__ import annotations

import torch


def encode_pairs(tokenizer, prompts, completions, ids=None) -> list[tuple[list[int], list[int]]]:
    """The (prompt_ids, completion_ids) of each pair: the given `ids` (sampled ids, trained as they are), else
    TRL's tokenisation of the text pairs."""
    from train.tokens import text_pair_ids

    if ids is not None:
        return [(list(p), list(c)) for p, c in ids]
    return [text_pair_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]


def _batches(pairs, pad_id, max_length, truncation_mode, batch_size, device):
    """(input_ids, attention_mask, completion_mask) batches collated exactly as TRL's DPO collator does."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length, truncation_mode=truncation_mode)
    for i in range(0, len(pairs), batch_size):
        examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": c} for p, c in pairs[i : i + batch_size]]
        batch = collate(examples)
        half = len(examples)  # the collator stacks [chosen; rejected]: the first half is ours
        yield (batch["input_ids"][:half].to(device), batch["attention_mask"][:half].to(device),
               batch["completion_mask"][:half].to(device))  # fmt: skip


def decoder(model):
    """The module that makes the final hidden states of a causal LM (its LM head left out)."""
    try:
        return model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return model.base_model


def _post(model, logits: torch.Tensor) -> torch.Tensor:
    """The transformations a causal LM applies after its LM head (Gemma 2/3 soft-capping, Cohere's logit scale,
    Granite's logit scaling); `head_matches` checks the rule on each model before it is used."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    scale = getattr(model, "logit_scale", None) or getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    div = getattr(cfg, "logits_scaling", None)
    if isinstance(div, (int, float)) and div != 1:
        logits = logits / div
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """[..., V] float32 logits of final hidden states [..., H], the LM head applied in float32.

    In bf16/fp16 the head's product rounded to the model's dtype has a spacing of 1/8 at a logit of 20: log-probs
    off by several hundredths per token. The head is therefore applied in float32 (weights upcast, one copy of the
    head's weight matrix while in use); what bf16 weights change in the layers below — π itself — stays changed.
    """
    head = model.get_output_embeddings()
    w = head.weight
    bias = getattr(head, "bias", None)
    if w.dtype != torch.float32:
        w = w.float()
        bias = None if bias is None else bias.float()
    return _post(model, torch.nn.functional.linear(hidden.float(), w, bias))


_CHECKED: dict = {}


def head_matches(model) -> bool:
    """Whether decoder + `head_logits` reproduce the model's own logits (checked once per model class and config
    on a four-token input); a model with a post-head rule not in `_post` gets the full-logits path instead."""
    key = (type(model).__name__, model.config.to_json_string(use_diff=True), str(next(model.parameters()).dtype))
    if key not in _CHECKED:
        ids = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device) % model.config.vocab_size
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits.float()
            got = head_logits(model, decoder(model)(input_ids=ids, use_cache=False).last_hidden_state)
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 5e-2
        _CHECKED[key] = want.shape == got.shape and bool(((want - got).abs() <= tol * (1 + want.abs())).all())
    return _CHECKED[key]


def hidden_states(model, ids, attn) -> torch.Tensor:
    """[B, T, H] final hidden states (the input of the LM head)."""
    return decoder(model)(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state


CHUNK_BYTES = 64 << 20  # float32 bytes of one [rows, V] block of logits: bounds the full-vocabulary working set


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one [rows, V] float32 block stays within `budget` bytes (at least one row)."""
    return max(1, budget // (4 * vocab))


def _logits_at(model, ids, attn, sel):
    """A function of a slice of the selected positions (`sel`: [B, T−1]) giving their float32 next-token logits
    [rows, V]: the final hidden states are kept ([P, H]) and the LM head is applied one slice at a time, so no
    [B, T, V] tensor is made. A model whose head `head_matches` does not reproduce gets its own full logits."""
    if head_matches(model):
        h = hidden_states(model, ids, attn)[:, :-1][sel]  # [P, H]
        return lambda c: head_logits(model, h[c])
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1][sel]  # [P, V]
    return lambda c: logits[c].float()


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: list,
    completions: list,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    ids: list | None = None,
) -> torch.Tensor:
    """[n] float32 summed completion log-probs log π(completion | prompt), batched, on the model's device; with
    `ids`, of those (prompt_ids, completion_ids) pairs as they are."""
    return logps_and_kl(model, [], tokenizer, prompts, completions, max_length, truncation_mode, batch_size,
                        ids=ids)[0]  # fmt: skip


@torch.no_grad()
def logps_and_kl(
    reference,
    models: list,
    tokenizer,
    prompts: list,
    completions: list,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_size: int = 8,
    finished: list[bool] | None = None,
    ids: list | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the same completions under a reference and M other policies, and token-level KLs (DESIGN §3).

    Returns (logp_ref [n], logp [n, M], kl [n, M]) with kl[i, j] = Σ_t KL(π_ref(·|x, y<t) ‖ π_j(·|x, y<t)) summed
    over the completion positions of sample i: the full-vocabulary KL along a reference sample, whose mean over
    y ~ π_ref is the sequence-level KL(π_ref ‖ π_j)(x) with lower variance than the mean of −(log π_j − log π_ref).
    Log-probs are `sequence_logps`'s (same tokenisation, EOS, truncation and completion mask).

    `finished[i]` False marks a sample that hit the generation limit: the EOS the DPO convention appends to it was
    not sampled from π_ref, so at that last position the KL (an expectation over a sampled token) is replaced by the
    log-ratio of the forced EOS itself. Without this, the two KL estimates disagree in expectation on truncated
    samples (tests/train/test_pecan_lm.py: more than 4 standard errors apart, and within them with the correction).
    With `ids` — the (prompt_ids, completion_ids) sampled — those ids are used as they are (`train.tokens`): no EOS
    is appended, so `finished` is not needed. With no `models`, only `logp_ref` is computed: `sequence_logps`.
    `chunk_bytes` bounds each [rows, V] float32 block of logits (`chunk_rows`); the results do not depend on it.
    """
    device = next(reference.parameters()).device
    ref_out, lp_out, kl_out = [], [], []
    pairs = encode_pairs(tokenizer, prompts, completions, ids)
    if ids is not None or finished is None:
        finished = [True] * len(pairs)  # sampled ids carry no appended EOS
    finished = torch.as_tensor(finished, dtype=torch.bool)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = chunk_rows(reference.get_output_embeddings().weight.shape[0], chunk_bytes)
    for b, (ids, attn, mask) in enumerate(_batches(pairs, pad_id, max_length, truncation_mode, batch_size, device)):
        n = len(ids)
        sel = mask[:, 1:].bool()  # [B, T−1] the positions that predict a completion token
        seq = sel.nonzero()[:, 0]  # [P] the sequence of each such position
        target = ids[:, 1:][sel]  # [P]
        # The last completion position of each sequence, when its EOS was appended rather than sampled.
        weights = sel.float()
        last = torch.zeros_like(sel)
        ends = weights.shape[1] - 1 - weights.flip(1).argmax(1)
        forced = ~finished[b * batch_size : b * batch_size + n].to(device)
        forced &= ids.gather(1, (ends + 1)[:, None])[:, 0] == tokenizer.eos_token_id
        last[torch.arange(n, device=device), ends] = forced
        last = last[sel]  # [P]
        ref_logits = _logits_at(reference, ids, attn, sel)
        others = [_logits_at(m, ids, attn, sel) for m in models]
        ref_tok = torch.empty(len(target), device=device)
        tok_lp = torch.empty(len(models), len(target), device=device)
        per_pos = torch.empty(len(models), len(target), device=device)
        for lo in range(0, len(target), rows):  # one [rows, V] block of each policy at a time
            c = slice(lo, lo + rows)
            ref_lp = torch.log_softmax(ref_logits(c), dim=-1)  # [rows, V]
            ref_tok[c] = ref_lp.gather(-1, target[c, None])[:, 0]
            ref_p = ref_lp.exp() if models else None
            for j, logits in enumerate(others):
                lp = torch.log_softmax(logits(c), dim=-1)
                tok_lp[j, c] = lp.gather(-1, target[c, None])[:, 0]
                per_pos[j, c] = torch.where(last[c], ref_tok[c] - tok_lp[j, c], (ref_p * (ref_lp - lp)).sum(-1))
                del lp
        ref_out.append(torch.zeros(n, device=device).index_add_(0, seq, ref_tok).cpu())
        lp_out.append(torch.zeros(n, len(models), device=device).index_add_(0, seq, tok_lp.T).cpu())
        kl_out.append(torch.zeros(n, len(models), device=device).index_add_(0, seq, per_pos.T).cpu())
    if not ref_out:
        return torch.zeros(0), torch.zeros(0, len(models)), torch.zeros(0, len(models))
    return torch.cat(ref_out), torch.cat(lp_out), torch.cat(kl_out)
