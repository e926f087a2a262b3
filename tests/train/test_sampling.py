"""Sampling (issue 12): the generation-backend interface and exact draws from a bf16 policy."""

import pytest

torch = pytest.importorskip("torch")


def test_a_backend_plugs_into_collection(tiny_lm):
    """Any `Backend` (an engine such as vLLM would be one) replaces the built-in loop: collection takes its ids as
    they are (the same prompt ids, stop ids and seed reach it) and decodes, flags and flattens them."""
    from train.collect import sample
    from train.sampling import Backend, ExactSampler, Samples, stop_ids

    model, tok, _ = tiny_lm
    seen = {}

    class Fixed:
        def sample(self, prompt_ids, k, max_new_tokens, stop, seed):
            seen.update(prompt_ids=prompt_ids, k=k, max_new_tokens=max_new_tokens, stop=stop, seed=seed)
            ids = [[[40 + j, tok.eos_token_id] if j % 2 else [40 + j] * max_new_tokens for j in range(k)]
                   for _ in prompt_ids]  # fmt: skip
            return Samples(ids, [[bool(j % 2) for j in range(k)] for _ in prompt_ids])

    assert isinstance(Fixed(), Backend) and isinstance(ExactSampler(model, tok.pad_token_id), Backend)
    out = sample(model, tok, ["hello", "tell me a joke."], 2, 3, 8, seed=7, backend=Fixed())
    assert seen["k"] == 2 and seen["max_new_tokens"] == 3 and seen["seed"] == 7
    assert seen["stop"] == stop_ids(model, tok) and seen["prompt_ids"][0] == tok("hello")["input_ids"]
    assert out["response_ids"] == [[40, 40, 40], [41, tok.eos_token_id]] * 2
    assert out["finished"] == [False, True] * 2
    assert out["response"][1] == tok.decode([41], skip_special_tokens=True)


def test_bf16_policy_samples_its_own_next_token_distribution(tiny_lm):
    """The loop draws from softmax of the float32-head logits of the bf16 model — the distribution whose log-probs
    `train.logps` records. 6000 first tokens of one prompt against probabilities computed independently in float64
    from the bf16 model's final hidden state: every token's frequency within 5 standard errors."""
    from train.logps import decoder
    from train.models import load_policy
    from train.sampling import sample_ids

    _, tok, path = tiny_lm
    bf16, _ = load_policy(str(path), dtype="bf16")
    prompt = tok("is it safe to mix bleach and ammonia?")["input_ids"]
    n = 6000
    gen = torch.Generator().manual_seed(0)
    drawn = sample_ids(bf16, [prompt], n, 1, [tok.eos_token_id], tok.pad_token_id, batch_size=n, generator=gen)
    counts = torch.bincount(torch.tensor([r[0] for r in drawn.ids[0]]), minlength=len(tok)).double()
    with torch.no_grad():
        h = decoder(bf16)(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1].double()
        p = torch.softmax(h @ bf16.get_output_embeddings().weight.detach().double().T, -1)
    freq = counts / n
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()


def _chi2(counts, p, n):
    """p-value of observed counts against probabilities p (cells with expected < 5 pooled)."""
    from scipy.stats import chisquare

    big = p * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).numpy()
    exp = torch.cat([p[big] * n, (p[~big].sum() * n)[None]]).numpy()
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_draw_follows_the_weights_exactly():
    """`draw` (one uniform per row, two-level inverse CDF) against the probabilities it is given: 300,000 draws from
    a heavy-tailed distribution over 1,000 tokens (not a multiple of the block), unnormalised weights; χ² against
    the weights themselves, zero weights never drawn, a band of tiny weights drawn about as often as expected."""
    from train.sampling import BLOCK, draw

    v = 1000
    assert v % BLOCK
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(v, generator=gen) * 3.0
    logits[[0, 5, 255, 256, 999]] = -float("inf")  # weight 0: at block edges and at the end
    logits[300:340] = logits.max() - 12.0  # 40 tokens of probability ~1e-6 each
    w = (logits - logits.max()).exp() * 1e3  # unnormalised
    p = w.double() / w.double().sum()
    counts = torch.zeros(v, dtype=torch.float64)
    n = 0
    for _ in range(30):
        tokens, total = draw(w.expand(10_000, v).contiguous(), gen)
        counts += torch.bincount(tokens, minlength=v).double()
        n += 10_000
    assert total[0].item() == pytest.approx(w.double().sum().item(), rel=1e-6)
    assert counts[[0, 5, 255, 256, 999]].sum() == 0
    assert _chi2(counts, p, n) > 1e-3
    tiny = p[300:340].sum().item() * n  # ≈ 12 expected draws in the band
    assert abs(counts[300:340].sum().item() - tiny) <= 5 * tiny**0.5 + 1


def test_the_loop_records_the_log_prob_of_each_sample(tiny_lm):
    """`Samples.logp` (read off the logits each token was drawn from) against one unpadded float64 forward pass
    over exactly the sampled ids — with two prompts of different lengths in one left-padded batch, and stop ids
    chosen among the likeliest first tokens so that many samples end early (nothing after the stop is counted)."""
    from train.sampling import sample_ids

    model, tok, _ = tiny_lm
    prompts = [tok("tell me a joke.")["input_ids"], tok("is it safe to mix bleach and ammonia? no.")["input_ids"]]
    with torch.no_grad():
        first = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    stop = torch.topk(first, 3).indices.tolist()
    drawn = sample_ids(model, prompts, 6, 5, stop, tok.pad_token_id, batch_size=12,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert any(f for row in drawn.finished for f in row) and not all(f for row in drawn.finished for f in row)
    for p, rows, lps in zip(prompts, drawn.ids, drawn.logp, strict=True):
        for r, lp in zip(rows, lps, strict=True):
            ids = torch.tensor([p + r])
            with torch.no_grad():
                ref = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            want = sum(ref[len(p) + t - 1, tid].item() for t, tid in enumerate(r))
            assert lp == pytest.approx(want, abs=1e-4)


def test_collect_takes_log_probs_from_the_loop_only_for_float32(tiny_lm, tmp_path, monkeypatch):
    """A float32 policy's logp_ref comes from the sampling loop (no second pass); a bf16 policy's from the DPO-way
    pass (`train.logps`), because its cached decoding and a full forward round differently (on SmolLM2 bf16: 0.3
    nats per 48-token sample, more than bf16 moves π from fp32) and DPO and evaluation recompute the pass's value."""
    import pyarrow.parquet as pq

    import train.logps
    from train.collect import CollectConfig, collect
    from train.models import load_policy

    _, tok, path = tiny_lm
    f = tmp_path / "prompts.txt"
    f.write_text("how do i bake bread?\ntell me a joke.\n")
    calls = []
    real = train.logps.logps_and_kl
    monkeypatch.setattr(train.logps, "logps_and_kl", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = dict(prompts=str(f), policy=str(path), k=3, max_new_tokens=6, scorers=["len=tests.train.toy_scorers:length"])
    collect(CollectConfig(**cfg), tmp_path / "fp32.parquet")
    assert calls == []
    t = pq.read_table(collect(CollectConfig(**cfg, dtype="bf16"), tmp_path / "bf16.parquet")).to_pylist()
    assert calls
    bf16, _ = load_policy(str(path), dtype="bf16")
    again = real(bf16.eval(), [], tok, None, None, ids=[(r["prompt_ids"], r["response_ids"]) for r in t])[0]
    assert torch.allclose(again, torch.tensor([r["logp_ref"] for r in t]), atol=1e-5)
