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
    """A tiny Llama vLLM's CPU backend runs (head size 32) over a word-level vocabulary, its next-token
    distribution peaked enough that a few thousand draws tell a distorted sampler from π_ref."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        model.lm_head.weight[2].add_(0.05 * model.lm_head.weight[0])  # EOS neither rare nor certain
    path = tmp_path_factory.mktemp("vllm-lm")
    model.save_pretrained(path)
    fast.save_pretrained(path)
    # A shipped generation_config that would distort the samples if it were applied.
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_k": 3, "top_p": 0.5,
                                                              "repetition_penalty": 1.5, "eos_token_id": 2}))
    return path


def _softmax_next(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()


def test_vllm_draws_pi_ref_exactly_and_its_log_probs_agree(vllm_lm):
    from scipy.stats import chisquare

    from train.sampling import VLLMSampler

    ids, n = [1, 7, 8, 9], 4000
    p = _softmax_next(vllm_lm, ids)
    sampler = VLLMSampler(str(vllm_lm))
    try:
        drawn = sampler.draw([ids], [7], n, 1, [2])
    finally:
        sampler.close()
    first = np.array([r[0] for r in drawn.ids[0]])
    counts = np.bincount(first, minlength=len(p))
    big = p * n >= 5  # chi-square cells with enough expected draws; the rest pooled
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(p[big] * n, p[~big].sum() * n)
    assert chisquare(obs, exp).pvalue > 1e-3, (counts[big], np.round(p[big] * n))
    # A sampler that applied the shipped generation_config (top-k 3) would never draw the 4th most likely token.
    assert counts[np.argsort(-p)[3:]].sum() > 0
    np.testing.assert_allclose(np.array(drawn.engine_logp[0]), np.log(p[first]), atol=1e-4)
    assert all(f == (r[-1] == 2) for r, f in zip(drawn.ids[0], drawn.finished[0], strict=True))


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

    from bridge.scores_table import collect_record
    from train.logps import sequence_logps
    from train.models import load_policy

    hf = pq.read_table(_collect(vllm_lm, tmp_path, "hf.parquet", "hf"))
    out = _collect(vllm_lm, tmp_path, "vllm.parquet", "vllm")
    table = pq.read_table(out)
    assert set(hf.column_names) | {"logp_engine"} == set(table.column_names)
    assert table.column("prompt_ids").to_pylist() == hf.column("prompt_ids").to_pylist()  # the same prompt ids
    model, tok = load_policy(str(vllm_lm))
    rows = table.to_pylist()
    ids = [(r["prompt_ids"], r["response_ids"]) for r in rows]
    ref = sequence_logps(model.eval(), tok, [r["prompt"] for r in rows], [r["response"] for r in rows], ids=ids)
    np.testing.assert_allclose(table.column("logp_ref").to_numpy(), ref.double().numpy(), atol=1e-4)
    gap = np.abs(table.column("logp_engine").to_numpy() - table.column("logp_ref").to_numpy())
    sampling = collect_record(out).sampling
    assert sampling["engine"] == "vllm" and sampling["logp_gap"]["max"] == pytest.approx(gap.max(), rel=1e-6)
    assert gap.max() < 1e-3
    assert collect_record(tmp_path / "hf.parquet").sampling == {"engine": "hf"}
    from bridge.dual import DualConfig, run

    cert = run(DualConfig(str(out), reward="len", beta=1.0, constraint=["brev=0.0"], bias=False))
    assert cert.data["sampling"] == sampling  # the certificate says which engine drew its samples
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
