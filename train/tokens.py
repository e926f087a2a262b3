"""The one tokenisation path of every stage (DESIGN §6).

Prompts are plain text or conversations (TRL's conversational format: a list of {"role", "content"} messages).
A prompt becomes ids exactly as TRL's DPO preprocessing makes them — a conversation through the tokenizer's chat
template with the generation prompt (applied once, as token ids: no second BOS), a text with the tokenizer's
special tokens — and sampling starts from those ids. The sampled ids are the ids scored and trained: collection
stores them (`prompt_ids`, `response_ids`), `can label` carries them into the pairs and `can train` trains on them
(`train.dpo.CanDPOTrainer`), so log π_ref recorded at collection is TRL's DPO log-prob of the stored pair.

The text of a response is what scorers and people read. Its re-tokenisation by TRL's text rule (decode → encode,
the chat template's trim and end-of-turn text, EOS appended to a truncated sample) may differ from the sampled ids;
`retokenizes` says where, and such samples are counted at collection. Stated rule: they are kept, and trained on
their sampled ids, never on a re-tokenisation.
"""

from __future__ import annotations

from can_jax.errors import CanError

Prompt = str | list  # text, or a list of {"role", "content"} messages


def is_conversation(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt)


PROMPT_ROLES = ("system", "user", "assistant", "tool")


def check_prompt(prompt, where: str = "prompt") -> Prompt:
    """A prompt as TRL takes it: non-empty text, or a non-empty list of messages with string roles (system, user,
    assistant, tool) and contents, ending with a turn that is not the assistant's."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise CanError(f"{where}: empty prompt")
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt:
        msgs = []
        for m in prompt:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise CanError(f"{where}: a conversation is a list of {{'role': str, 'content': str}} messages, "
                               f"got {m!r:.80}")  # fmt: skip
            if m["role"] not in PROMPT_ROLES:
                raise CanError(f"{where}: a message has role {m['role']!r}; roles are {', '.join(PROMPT_ROLES)}")
            msgs.append({"role": m["role"], "content": m["content"]})
        if msgs[-1]["role"] == "assistant":
            raise CanError(f"{where}: the conversation ends with the assistant's turn; a prompt ends with the user's "
                           "(the response is sampled)")  # fmt: skip
        if not any(m["content"].strip() for m in msgs):
            raise CanError(f"{where}: empty prompt (every message is empty)")
        return msgs
    raise CanError(f"{where}: a prompt is text or a list of messages, got {type(prompt).__name__}")


def has_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def as_prompts(tok, prompts: list, chat_template: bool = True, name: str = "the policy", where: str | None = None
               ) -> list:  # fmt: skip
    """The prompts as TRL should see them: with `chat_template` and a tokenizer that has one, text prompts become
    one-turn user conversations (the template is then applied once, as ids); conversations need a template.
    `where` (the prompt file, one prompt a line) lets a refusal name the file and the line."""
    conv = [is_conversation(p) for p in prompts]
    at = f"{where} line {conv.index(True) + 1} is a conversation: " if where and any(conv) else ""
    if any(conv) and not has_template(tok):
        raise CanError(f"{at}conversational prompts need a chat template, and {name}'s tokenizer has none: "
                       "give plain-text prompts or a policy with a chat template")  # fmt: skip
    if chat_template and has_template(tok):
        return [p if c else [{"role": "user", "content": p}] for p, c in zip(prompts, conv, strict=True)]
    if any(conv) and not all(conv):
        raise CanError(f"{at}prompts mix text and conversations: with --no-chat-template all must be text")
    return list(prompts)


def prompt_ids(tok, prompt: Prompt) -> list[int]:
    """TRL's ids for a prompt alone (DPO preprocessing): template + generation prompt, or text + special tokens."""
    from trl.data_utils import _tokenize

    if is_conversation(prompt):
        return list(_tokenize(tok, list(prompt), add_generation_prompt=True)["input_ids"])
    return list(_tokenize(tok, prompt)["input_ids"])


def completion_of(prompt: Prompt, text: str):
    """A response text in the prompt's format: text, or a one-message assistant turn."""
    return [{"role": "assistant", "content": text}] if is_conversation(prompt) else text


def text_pair_ids(tok, prompt: Prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) as TRL's DPO preprocessing splits a *text* pair: EOS appended to a text
    completion, the completion starting where prompt and prompt+completion tokenisations diverge."""
    from trl.data_utils import _tokenize, common_prefix_length

    if is_conversation(prompt):
        if isinstance(completion, str):
            completion = completion_of(prompt, completion)
        p_ids = _tokenize(tok, list(prompt), add_generation_prompt=True)["input_ids"]
        full = _tokenize(tok, list(prompt) + list(completion))["input_ids"]
    else:
        if tok.eos_token and not completion.endswith(tok.eos_token):
            completion = completion + tok.eos_token
        p_ids = _tokenize(tok, prompt)["input_ids"]
        full = _tokenize(tok, prompt + completion)["input_ids"]
    n = common_prefix_length(p_ids, full)
    return list(p_ids[:n]), list(full[n:])


def retokenizes(tok, prompt: Prompt, text: str, p_ids: list[int], r_ids: list[int]) -> bool:
    """Whether TRL's text rule, applied to the stored (prompt, response text), gives back the sampled ids."""
    return text_pair_ids(tok, prompt, completion_of(prompt, text)) == (list(p_ids), list(r_ids))


def tokenizer_fingerprint(tok) -> str:
    """A hash of what makes token ids mean something (vocabulary, special tokens, chat template): pairs of sampled ids
    are trained only by a policy whose tokenizer has the same fingerprint."""
    import hashlib
    import json

    blob = json.dumps([sorted(tok.get_vocab().items()), tok.bos_token, tok.eos_token,
                       getattr(tok, "chat_template", None)], default=str)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()
