"""Prompts and sampling shared by `can collect` and `can evaluate`: reading prompt files (text or TRL
conversations), checking the numbers and paths a stage is given, fitting prompts into the model's context, and
drawing K samples per prompt from π_ref exactly (`train.sampling`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from can_jax.errors import CanError, at_least_one


def check_sampling(k: int, max_new_tokens: int, batch_size: int, k_name: str = "--k") -> None:
    """K ≥ 1 samples, responses of at least one token, batches of at least one sequence."""
    at_least_one((k_name, k), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size))


def ensure_dir(path: str | os.PathLike) -> Path:
    """`path` as a folder, created if needed; `OutputError` (one line naming it) where it cannot be: a file in the
    way or as a parent, no permission, a read-only disk."""
    from bridge.files import path_problem
    from can_jax.errors import OutputError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {path_problem(path, err)}") from None
    return path


def ensure_file_parent(path: str | os.PathLike) -> Path:
    """The folder of an output file created (`ensure_dir`); `OutputError` when the file's path is a folder."""
    from can_jax.errors import OutputError

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    ensure_dir(path.parent)
    return path


def context_length(model, tok) -> int | None:
    """The policy's context in tokens (its position limit), or None when it declares none."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(tok, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 10**7 else None


def check_context(model, tok, prompts: list, max_new_tokens: int, where: str = "prompts", name: str = "the policy"):
    """Refuses a prompt (as TRL sees it) whose ids plus `max_new_tokens` do not fit in the policy's context: the
    samples past it would be garbage (or an index error)."""
    limit = context_length(model, tok)
    for i, p in enumerate(prompts):
        n = len(prompt_ids_or_fail(tok, p, f"{where} line {i + 1}", name))  # a template's refusal: file and line
        if limit is not None and n + max_new_tokens > limit:
            raise CanError(f"{where}: the prompt on line {i + 1} is {n} tokens, and with --max-new-tokens "
                           f"{max_new_tokens} it does not fit in {name}'s context of {limit} tokens: shorten it "
                           "or lower --max-new-tokens")  # fmt: skip


def prompt_ids_or_fail(tok, prompt, where: str, name: str = "the policy") -> list[int]:
    """TRL's ids of a prompt (`train.tokens.prompt_ids`); a conversation the chat template refuses (roles out of
    order, a role it does not know) is one line naming `where` (the file and line) and the template's reason."""
    from train.tokens import is_conversation, prompt_ids

    if not is_conversation(prompt):
        return prompt_ids(tok, prompt)
    try:
        return prompt_ids(tok, prompt)
    except Exception as err:  # noqa: BLE001 — jinja2's TemplateError, or whatever a template's raise_exception raises
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise CanError(f"{where}: {name}'s chat template refuses this conversation ({reason})") from None


def read_prompts(path: str | os.PathLike) -> list:
    """One prompt per line (.txt), or per line a JSON object whose "prompt" is text or a conversation — a list of
    {"role", "content"} messages, TRL's conversational format (.jsonl). Empty prompts are an error."""
    from train.tokens import check_prompt

    path = Path(path)
    if not path.exists():
        raise CanError(f"prompt file not found: {path}")
    if path.is_dir():
        raise CanError(f"{path} is a directory: give a .txt or .jsonl file of prompts")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise CanError(f"{path}: not UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()  # trailing newlines are fine
    if not lines:
        raise CanError(f"{path}: no prompts")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise CanError(f"{path}: give prompts as .jsonl (one JSON object per line, its \"prompt\" text or a "
                       "conversation) or .txt (one prompt per line)")  # fmt: skip
    if suffix != ".jsonl" and lines[0].lstrip().startswith('{"prompt"'):
        raise CanError(f"{path}: its lines are JSON objects; name the file .jsonl to read their \"prompt\" fields "
                       "(as text each line would be one literal prompt)")  # fmt: skip
    if suffix == ".jsonl":
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln) if ln.strip() else {}
            except json.JSONDecodeError as err:
                raise CanError(f"{path}: line {i} is not JSON ({err})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise CanError(f'{path}: line {i} has no "prompt" field')
            prompts.append(check_prompt(row["prompt"], f"{path} line {i}"))
        return prompts
    empty = [i + 1 for i, p in enumerate(lines) if not p.strip()]
    if empty:
        raise CanError(f"{path}: empty prompt on line(s) {empty[:10]}; remove them")
    return lines


def sample(model, tok, prompts: list, k: int, max_new_tokens: int, batch_size: int, seed: int = 0,
           backend=None) -> dict:  # fmt: skip
    """K samples of π_ref per prompt (prompts as TRL sees them: `train.tokens.as_prompts`), flattened prompt-major:
    {"prompt", "response", "prompt_ids", "response_ids", "finished", "retokenizes"} lists of n·K, and "logp" (log π
    of each sample's ids, from the logits it was drawn from) when the backend reports it ("logp_engine" for an
    engine's own). `backend`: a `train.sampling.Backend` (default: the exact loop on `model`)."""
    from train.sampling import ExactSampler, stop_ids
    from train.tokens import prompt_ids, retokenizes

    check_sampling(k, max_new_tokens, batch_size)
    p_ids = [prompt_ids(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    backend = backend or ExactSampler(model, pad, batch_size)
    drawn = backend.sample(p_ids, k, max_new_tokens, stop_ids(model, tok), seed)
    out = {"prompt": [], "response": [], "prompt_ids": [], "response_ids": [], "finished": [], "retokenizes": []}
    if drawn.logp is not None:
        out["logp"] = [lp for row in drawn.logp for lp in row]
    if drawn.engine_logp is not None:
        out["logp_engine"] = [lp for row in drawn.engine_logp for lp in row]
    for p, ids, rs, fs in zip(prompts, p_ids, drawn.ids, drawn.finished, strict=True):
        for r, f in zip(rs, fs, strict=True):
            text = tok.decode(r, skip_special_tokens=True)  # the stop id among the special tokens left out
            out["prompt"].append(p)
            out["response"].append(text)
            out["prompt_ids"].append(ids)
            out["response_ids"].append(r)
            out["finished"].append(f)
            out["retokenizes"].append(retokenizes(tok, p, text, ids, r))
    return out


def prompt_key(prompt) -> str | None:
    """A prompt as the policy sees it, whitespace-normalised: text counts as a one-turn user conversation, a
    conversation is keyed by all its messages (another system prompt or earlier turn is another prompt). None for
    an empty or malformed one."""
    if prompt is None:
        return None
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        norm = [[str(m["role"]), " ".join(str(m["content"]).split())] for m in msgs]
    except (TypeError, KeyError):
        return None
    return json.dumps(norm, ensure_ascii=False) if any(c for _, c in norm) else None


def shown_prompt(key: str) -> str:
    """A prompt key as an error line shows it: its last message, cut to 80 characters."""
    return repr(json.loads(key)[-1][1][:80])


def training_prompts(scores: str) -> list:
    """A scores table's prompts (`table_prompts`) from its file. An unreadable table is refused in one line."""
    from bridge.tables import read_table

    return table_prompts(read_table(scores, columns=["instruction", "prompt"]))


def table_ids(table) -> list | None:
    """The sampled (prompt ids, response ids) of a scores table's rows, as collected and trained; None without them."""
    if not {"prompt_ids", "response_ids"} <= set(table.column_names):
        return None
    return list(zip(table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist(), strict=True))


def table_prompts(table) -> list:
    """A scores table's prompts: its `instruction` column, else `prompt`; [] when it has neither."""
    col = next((c for c in ("instruction", "prompt") if c in table.column_names), None)
    return [] if col is None else table.column(col).to_pylist()


def check_prompts_apart(calibration: list, test: list | None, table) -> None:
    """Calibration prompts steer λ and test prompts judge the rounds: neither may repeat, share a prompt with the
    other, or be a training prompt of the scores table (gains there read higher than on fresh prompts). Refused in
    one line, before any model work."""

    def clash(a, b, what):
        shared = sorted((set(a) & set(b)) - {None})
        if shared:
            raise CanError(f"{len(shared)} {what} (e.g. {shown_prompt(shared[0])}): {_APART}")

    cal = [prompt_key(p) for p in calibration]
    test = [prompt_key(p) for p in test or []]
    for keys, name in ((cal, "calibration"), (test, "test")):
        seen, repeats = set(), []
        for k in keys:
            if k is not None and k in seen:
                repeats.append(k)
            seen.add(k)
        if repeats:
            raise CanError(f"{len(repeats)} {name} prompt(s) repeat an earlier one (e.g. "
                           f"{shown_prompt(repeats[0])}): the intervals are over distinct prompts; remove the "
                           "repeats")  # fmt: skip
    clash(cal, test, "calibration prompt(s) are also test prompts")
    train = {prompt_key(p) for p in table_prompts(table)}
    clash(cal, train, "calibration prompt(s) are training prompts of the scores table")
    clash(test, train, "test prompt(s) are training prompts of the scores table")


_APART = ("calibration prompts steer the rounds and test prompts judge them, so both must be fresh to the policy and "
          "apart from each other; use prompts the policy was not trained on, in one file each")
