"""Templates: how a prompt and a response become the text a score model reads.

Prompts. A prompt is a string or a conversation in TRL's conversational format: a list of {"role", "content"} dicts
(roles system/user/assistant, possibly multi-turn with earlier assistant turns), ending with a user message. Built-in
scorers read the text of that last user message (`last_user_text`). Module functions receive each prompt as given
(str or list of dicts). Score models render the conversation with their template:

- "safe-rlhf": Safe-RLHF's conversation format, as their score models were trained (their PreferenceDataset:
  prompt + answer + EOS, tokenised with the tokenizer's special tokens, i.e. a Llama BOS):
  `BEGINNING OF CONVERSATION: USER: {u1} ASSISTANT:{a1}<eos>USER: {u2} ASSISTANT:{response}<eos>` — every user turn
  is `USER: {text} ASSISTANT:`, every earlier assistant turn is its text followed by the EOS token, and the scored
  response ends with the EOS token (left out where the tokenizer has none). The format has no system role: system
  messages are dropped; user and assistant turns must alternate.
- "chat": the scorer tokenizer's own chat template applied to the conversation plus {"role": "assistant",
  "content": response} (tokenised without adding special tokens again: the template writes its own BOS).
- any other string: a format string with `{prompt}` and `{response}`, tokenised with the tokenizer's special
  tokens. A plain prompt fills `{prompt}` as is; a conversation fills it with its earlier messages, one per line as
  `Role: content` (System/User/Assistant), followed by the text of its last user message — a one-message
  conversation gives exactly the plain prompt.
- "auto" (default): "safe-rlhf" for a Safe-RLHF score model, "chat" for a classifier whose tokenizer has a chat
  template, else "safe-rlhf".
"""

from __future__ import annotations

from can_jax.errors import CanError

SAFE_RLHF = "safe-rlhf"
SAFE_RLHF_TEMPLATE = SAFE_RLHF  # name kept for callers of the old format-string constant
CHAT = "chat"
_SAFE_BEGIN, _SAFE_USER, _SAFE_ASSISTANT = "BEGINNING OF CONVERSATION: ", "USER: {} ", "ASSISTANT:"


def as_messages(prompt) -> list[dict]:
    """A prompt as a conversation: a string is one user message; a conversation is checked (ends with a user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    try:
        messages = [dict(m) for m in prompt]
    except (TypeError, ValueError):
        raise CanError(
            f"a prompt must be a string or a list of {{role, content}} messages, not {prompt!r:.80}"
        ) from None
    for m in messages:
        if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise CanError(f"a conversation message needs role system/user/assistant and text content: {m!r:.80}")
    if not messages or messages[-1]["role"] != "user":
        raise CanError("a conversational prompt must end with a user message (the one the response answers)")
    return messages


def last_user_text(prompt) -> str:
    """The text a built-in scorer reads: the prompt itself, or the content of a conversation's last user message."""
    return as_messages(prompt)[-1]["content"]


def render_prompt(prompt) -> str:
    """What a conversation puts in a template's `{prompt}`: earlier messages as `Role: content` lines, then the
    last user message's text (a plain prompt, or a one-message conversation, is its text as is)."""
    messages = as_messages(prompt)
    lines = [f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1]]
    return "".join(lines) + messages[-1]["content"]


def render_safe_rlhf(prompt, response: str, eos: str | None) -> str:
    """Safe-RLHF's multi-turn format (see the module docstring)."""
    turns = [m for m in as_messages(prompt) if m["role"] != "system"]
    parts = [_SAFE_BEGIN]
    for i, m in enumerate(turns):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise CanError("the Safe-RLHF template needs alternating user/assistant turns starting with a user turn")
        parts.append(_SAFE_USER.format(m["content"]) + _SAFE_ASSISTANT if i % 2 == 0 else m["content"] + (eos or ""))
    return "".join(parts) + response + (eos or "")


def resolve_template(template: str, *, safe_rlhf: bool, chat_template: bool, where: str) -> str:
    """The template a score model uses: "auto" resolved by the rule above, then checked (`where` names the model in
    errors). `safe_rlhf`: the model is a Safe-RLHF score model; `chat_template`: its tokenizer has one."""
    if template == "auto":
        template = SAFE_RLHF if safe_rlhf or not chat_template else CHAT
    if template == CHAT and not chat_template:
        raise CanError(f"scorer {where}: template 'chat' but its tokenizer has no chat template")
    if template not in (SAFE_RLHF, CHAT):
        try:
            template.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as err:
            raise CanError(f"scorer template {template!r} is not a format string with {{prompt}} and "
                           f"{{response}} only ({type(err).__name__}: {err})") from None  # fmt: skip
        if "{response}" not in template:
            raise CanError(f"scorer template {template!r} has no {{response}}")
    return template


def render(template: str, prompt, response: str, tok) -> tuple[str, bool]:
    """(text, add_special_tokens) of one (prompt, response) pair under a resolved `template`, for tokenizer `tok`."""
    if template == SAFE_RLHF:
        return render_safe_rlhf(prompt, response, tok.eos_token), True
    if template == CHAT:
        messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
        return tok.apply_chat_template(messages, tokenize=False), False
    return template.format(prompt=render_prompt(prompt), response=response), True
