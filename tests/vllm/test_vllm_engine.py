"""`can collect --engine vllm` against the Transformers path: the same prompt ids, exactly π_ref (the first token's
frequencies against the softmax of a Transformers forward), log π_ref from the Transformers forward with vLLM's own
log-probs beside it, and a resumed run that reproduces the table on CPU. Runs where vLLM is installed (its own
virtualenv: scripts/test_vllm.sh); skipped elsewhere."""

import json
import os

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
PROMPTS = ["w1 w2 w3", "w4 w5", "w7 w8 w9 w10", "w11", "w12 w13", "w14 w15 w16"]


@pytest.fixture(scope="module")
def vllm_lm(tmp_path_factory):
    """A tiny Llama vLLM's CPU backend runs (head size 64) over a word-level vocabulary, its next-token
    distribution peaked enough that a few thousand draws tell a distorted sampler from π_ref, shipping a
    generation_config (temperature 0.7, top-k 5) that would show if it leaked into the samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
        model.lm_head.weight[2].add_(0.05 * model.lm_head.weight[0])  # EOS neither rare nor certain
    path = tmp_path_factory.mktemp("vllm-lm")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_k": 5, "do_sample": True,
                                                              "eos_token_id": 2}))  # fmt: skip
    return path


PROBES = [[1, 7, 8, 9], [1, 20], [1, 33, 34, 35, 36, 37]]


def _next_token_probs(path, ids):
    """A plain Transformers forward: softmax of the last position's logits, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()


def _chi2_pvalue(first, p):
    from scipy.stats import chisquare

    n = len(first)
    counts = np.bincount(first, minlength=len(p))
    big = p * n >= 5  # cells with enough expected draws; the rest pooled into one
    return chisquare(np.append(counts[big], counts[~big].sum()), np.append(p[big] * n, p[~big].sum() * n)).pvalue


def test_vllm_draws_pi_ref_exactly_and_the_test_has_power(vllm_lm):
    """The first token of 3,000 samples of each probe prompt against the Transformers softmax: π_ref passes a χ²
    test at α = 1e-3; the same test rejects vLLM's draws at temperature 0.9 and at top-k 5."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from train.sampling import VLLMSampler

    n = 3000
    probs = [_next_token_probs(vllm_lm, ids) for ids in PROBES]
    sampler = VLLMSampler(str(vllm_lm))
    try:
        drawn = sampler.draw(PROBES, [7, 8, 9], n, 1, [2])
        distorted = {}
        for name, extra in (("T=0.9", {"temperature": 0.9}), ("top-k 5", {"temperature": 1.0, "top_k": 5})):
            params = SamplingParams(n=n, max_tokens=1, seed=11, ignore_eos=True, detokenize=False, **extra)
            outs = sampler.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in PROBES], params,
                                        use_tqdm=False)  # fmt: skip
            distorted[name] = [np.array([o.token_ids[0] for o in out.outputs]) for out in outs]
    finally:
        sampler.close()
    for i, p in enumerate(probs):
        first = np.array([r[0] for r in drawn.ids[i]])
        assert _chi2_pvalue(first, p) > 1e-3, (i, np.bincount(first, minlength=len(p))[:12], np.round(p[:12] * n))
        np.testing.assert_allclose(np.array(drawn.engine_logp[i]), np.log(p[first]), atol=1e-4)
        assert all(f == (r[-1] == 2) for r, f in zip(drawn.ids[i], drawn.finished[i], strict=True))
        for name, draws in distorted.items():
            assert _chi2_pvalue(draws[i], p) < 1e-3, (name, i)


def _collect(path, tmp_path, out, engine, **kw):
    from train.collect import CollectConfig, collect

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    scorers = ["len=tests.train.toy_scorers:length", "brev=tests.train.toy_scorers:brevity"]
    cfg = CollectConfig(prompts=str(prompts), policy=str(path), scorers=scorers, k=4, max_new_tokens=6, shard_size=2,
                        chat_template=False, engine=engine, **kw)  # fmt: skip
    return collect(cfg, tmp_path / out)


def test_collect_with_vllm_keeps_the_table_format_and_log_pi_ref_of_the_forward(vllm_lm, tmp_path):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from bridge.scores_table import collect_record

    hf = pq.read_table(_collect(vllm_lm, tmp_path, "hf.parquet", "hf"))
    out = _collect(vllm_lm, tmp_path, "vllm.parquet", "vllm")
    table = pq.read_table(out)
    assert set(hf.column_names) | {"logp_engine"} == set(table.column_names)
    assert table.column("prompt_ids").to_pylist() == hf.column("prompt_ids").to_pylist()  # the same prompt ids
    model = AutoModelForCausalLM.from_pretrained(vllm_lm, dtype=torch.float32)
    ref = []
    for row in table.to_pylist():  # a plain forward: Σ log softmax of each response token given what precedes it
        ids = row["prompt_ids"] + row["response_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        start = len(row["prompt_ids"])
        ref.append(float(sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))))
    np.testing.assert_allclose(table.column("logp_ref").to_numpy(), ref, atol=1e-4)
    gap = np.abs(table.column("logp_engine").to_numpy() - table.column("logp_ref").to_numpy())
    sampling = collect_record(out).sampling
    assert sampling["engine"] == "vllm" and sampling["logp_gap"]["max"] == pytest.approx(gap.max(), rel=1e-6)
    assert gap.max() < 1e-3
    assert collect_record(tmp_path / "hf.parquet").sampling == {"engine": "hf"}
    from bridge.dual import DualConfig, run

    cert = run(DualConfig(str(out), reward="len", beta=1.0, constraint=["brev=0.0"], bias=False))
    assert cert.data["sampling"] == sampling  # the certificate says which engine drew its samples
    # The chain goes on from the vLLM table: label, then DPO on the sampled ids.
    from train import dpo, label
    from train.settings import DPOSettings, TrainConfig

    cert.write(tmp_path / "cert.json")
    _, stats = label.run(label.LabelConfig(str(out), str(tmp_path / "cert.json"), out=str(tmp_path / "prefs.parquet"),
                                           mode="soft", pairs_per_prompt=2))  # fmt: skip
    assert stats.pairs > 0
    policy = dpo.run(TrainConfig(str(tmp_path / "prefs.parquet"), policy=str(vllm_lm), out=str(tmp_path / "run"),
                                 dpo=DPOSettings(epochs=1, lr=1e-3, batch_size=4, precision="fp32"),
                                 chat_template=False))  # fmt: skip
    assert (policy / "certificate.json").is_file()
    # Killed after some shards: a rerun redraws only what is missing, and per-prompt seeds give the same table.
    shards = out.with_name(out.name + ".shards")
    os.remove(out)
    for s in (1, 2):
        (shards / f"shard-{s:05d}.parquet").unlink()
    (shards / "shard-00002.samples.json").unlink()
    again = pq.read_table(_collect(vllm_lm, tmp_path, "vllm.parquet", "vllm"))
    for name in ("response_ids", "finished", "logp_ref"):
        assert again.column(name).to_pylist() == table.column(name).to_pylist(), name


def test_many_long_prompts_with_their_seeds_sample_on_cpu(vllm_lm):
    """More prompt tokens than one engine step takes: with chunked prefill a seeded request rewinds its generator
    between chunks, which a CPU generator cannot do; the sampler turns chunked prefill off on CPU."""
    from train.sampling import VLLMSampler

    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(4, 64, size=40).tolist()] for _ in range(32)]
    sampler = VLLMSampler(str(vllm_lm), options={"max_model_len": 64})
    try:
        drawn = sampler.draw(prompts, list(range(32)), 8, 4, [2])
        again = sampler.draw(prompts[:3], list(range(3)), 8, 4, [2])  # a prompt's samples: its seed alone
    finally:
        sampler.close()
    assert [len(rows) for rows in drawn.ids] == [8] * 32
    assert again.ids == drawn.ids[:3]
