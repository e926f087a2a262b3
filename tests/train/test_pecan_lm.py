"""PeCAN on language models (DESIGN §3): log-probs under several policies and the token-level KL, collection with
pre-aligned models, `can dual --pecan`, and `can prealign` — checked against hand computations."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from can_jax.errors import CanError  # noqa: E402

PROMPTS = ["how do i bake bread?", "tell me a joke.", "is it safe to mix bleach?", "what is paris?"]


def _kl_by_hand(ref, other, tok, prompt, completion):
    """Σ over completion positions of KL(π_ref(·|prefix) ‖ π_other(·|prefix)), one unpadded sequence, in float64."""
    from train.tokens import text_pair_ids

    p_ids, c_ids = text_pair_ids(tok, prompt, completion)
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        a = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)
        b = torch.log_softmax(other(input_ids=ids).logits[0].double(), -1)
    total = 0.0
    for i in range(len(c_ids)):  # position len(p_ids)+i-1 predicts completion token i
        pos = len(p_ids) + i - 1
        total += float((a[pos].exp() * (a[pos] - b[pos])).sum())
    return total


def test_logps_and_kl_match_sequence_logps_and_a_hand_kl(tiny_lm, other_lm):
    from train.logps import logps_and_kl, sequence_logps

    model, tok, _ = tiny_lm
    other = other_lm[0]
    prompts = ["what is the capital of france?", "hello", "tell me a joke."]
    completions = [" paris.", " hi there, how can i help?", " why did the chicken cross the road?"]
    logp_ref, logp, kl = logps_and_kl(model, [other, model], tok, prompts, completions, batch_size=2)
    assert torch.allclose(logp_ref, sequence_logps(model, tok, prompts, completions), atol=1e-5)
    assert torch.allclose(logp[:, 0], sequence_logps(other, tok, prompts, completions), atol=1e-5)
    assert torch.allclose(logp[:, 1], logp_ref, atol=1e-6)
    assert torch.allclose(kl[:, 1], torch.zeros(3), atol=1e-6)  # KL of a policy to itself
    for i in range(3):
        assert kl[i, 0].item() == pytest.approx(_kl_by_hand(model, other, tok, prompts[i], completions[i]), rel=1e-4)
    assert (kl[:, 0] > 0).all()


@pytest.fixture(scope="module")
def word_lms():
    """Two tiny LMs over a word-level vocabulary whose decode → encode round trip is exact (a byte-level BPE
    model with random weights emits invalid UTF-8 pieces, so its decoded samples re-tokenize differently and are
    no longer samples of π_ref as the DPO log-prob sees them). The only special token is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "</s> tell me a joke : why the chicken road cross to get other side yes no safe never mix".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="no"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=0,
                         bos_token_id=None)  # fmt: skip
    torch.manual_seed(3)
    ref, other = LlamaForCausalLM(config), LlamaForCausalLM(config)
    with torch.no_grad():  # sharper next-word distributions than a random init gives: KLs well above noise
        ref.lm_head.weight.mul_(8.0)
        other.lm_head.weight.mul_(8.0)
    ref.generation_config.bos_token_id = None
    return ref, other, tokenizer


def test_token_kl_and_sample_estimate_agree_in_expectation(word_lms):
    """Along samples of π_ref, the mean token-level KL and the mean of log π_ref − log π_other estimate the same
    sequence KL: with 600 samples they agree within their standard errors, and the token-level one has the smaller
    spread. Most samples hit the 4-word limit, so this also checks the forced-EOS correction (without it the
    token-level mean is biased)."""
    from train.collect import sample
    from train.logps import logps_and_kl
    from train.tokens import text_pair_ids

    ref, other, tok = word_lms
    prompt, n = "tell me a joke :\n", 600
    drawn = sample(ref, tok, [prompt], n, 4, 200, seed=0)
    responses, finished = drawn["response"], drawn["finished"]
    assert 0 < sum(finished) < n - 100
    assert all(text_pair_ids(tok, prompt, r)[1][-1] == tok.eos_token_id for r in responses)
    logp_ref, logp, kl = logps_and_kl(ref, [other], tok, [prompt] * n, responses, batch_size=200, finished=finished)
    sample_est = (logp_ref - logp[:, 0]).double().numpy()
    token_est = kl[:, 0].double().numpy()
    se = np.hypot(sample_est.std(), token_est.std()) / np.sqrt(n)
    assert abs(sample_est.mean() - token_est.mean()) < 4 * se
    assert token_est.std() < sample_est.std()
    # Treating every appended EOS as sampled biases the token-level estimate here.
    _, _, naive = logps_and_kl(ref, [other], tok, [prompt] * n, responses, batch_size=200)
    # The correction moves the token-level estimate by far more than its noise (paired over the same samples).
    shift = naive[:, 0].double().numpy() - token_est
    assert abs(shift.mean()) > 4 * shift.std() / np.sqrt(n)
    # On the sampled ids themselves (what collect records and DPO trains: no EOS appended) no correction is needed.
    ids = list(zip(drawn["prompt_ids"], drawn["response_ids"], strict=True))
    logp_ref, logp, kl = logps_and_kl(ref, [other], tok, None, None, batch_size=200, ids=ids)
    sample_est, token_est = (logp_ref - logp[:, 0]).double().numpy(), kl[:, 0].double().numpy()
    se = np.hypot(sample_est.std(), token_est.std()) / np.sqrt(n)
    assert abs(sample_est.mean() - token_est.mean()) < 4 * se


def _prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def test_collect_with_aligned_models_and_dual_pecan(tiny_lm, other_lm, tmp_path):
    from typer.testing import CliRunner

    from train.cli import app
    from train.collect import CollectConfig, collect

    _, _, path = tiny_lm
    other = other_lm[1]
    cfg = CollectConfig(prompts=str(_prompts_file(tmp_path)), policy=str(path), scorers=[], k=4, max_new_tokens=6,
                        batch_size=8, shard_size=2, aligned=[f"help={other}@0.5", f"safe={other}@0.25"])  # fmt: skip
    out = collect(cfg, tmp_path / "pecan.parquet")
    t = pq.read_table(out).to_pandas()
    assert len(t) == 16
    np.testing.assert_allclose(t["help"], 0.5 * (t["logp_help"] - t["logp_ref"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["safe"], 0.25 * (t["logp_safe"] - t["logp_ref"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["ref_safe"], -0.25 * t["kl_safe"], rtol=1e-6)
    from bridge.scores_table import collect_record

    assert collect_record(out).pecan["safe"]["beta"] == 0.25

    runner = CliRunner()
    cert_path = tmp_path / "cert.json"
    base = ["dual", str(out), "--pecan", "--reward", "help", "--beta", "0.5", "--out", str(cert_path), "--json"]
    res = runner.invoke(app, [*base, "--constraint", "safe=0.0"])
    assert res.exit_code == 0, res.output
    cert = json.loads(cert_path.read_text())
    assert cert["data"]["reference_expectation"] == {"safe": "ref_safe"}
    kl = cert["pecan"]["kl"]["safe"]
    # The summary's two estimates, recomputed by hand from the table.
    by_prompt = t.assign(s=t["logp_ref"] - t["logp_safe"]).groupby("prompt_id")
    assert kl["sample"] == pytest.approx(by_prompt["s"].mean().mean(), rel=1e-9)
    assert kl["token"] == pytest.approx(by_prompt["kl_safe"].mean().mean(), rel=1e-9)
    # The same columns for responses already sampled (no new sampling): `can logratios` on the MoCAN-style part.
    plain_part = tmp_path / "samples.parquet"
    keep = ["prompt_id", "prompt", "response", "finished", "prompt_ids", "response_ids"]
    pq.write_table(pq.read_table(out).select(keep), plain_part)
    res = runner.invoke(app, ["logratios", str(plain_part), "-a", f"safe={other}@0.25", "--policy", str(path), "-o",
                              str(tmp_path / "again.parquet")])  # fmt: skip
    assert res.exit_code == 0, res.output
    again = pq.read_table(tmp_path / "again.parquet").to_pandas()
    np.testing.assert_allclose(again["safe"], t["safe"], atol=1e-5)
    np.testing.assert_allclose(again["kl_safe"], t["kl_safe"], rtol=1e-4, atol=1e-6)
    res = runner.invoke(app, ["logratios", str(tmp_path / "none.parquet"), "-a", f"safe={other}@0.25"])
    assert res.exit_code == 1 and "not found" in res.output
    # A name that is not a pre-aligned model of the table, and a plain MoCAN table given --pecan: one line each.
    res = runner.invoke(app, [*base, "--constraint", "nope=0.0"])
    assert res.exit_code == 1 and "not pre-aligned models" in res.output
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt_id": [0, 0, 1, 1], "help": [1.0, 2, 3, 4], "safe": [0.0, 1, 1, 0]}), plain)
    res = runner.invoke(app, ["dual", str(plain), "--pecan", "--reward", "help", "--beta", "1", "-c", "safe=0"])
    assert res.exit_code == 1 and "not a PeCAN table" in res.output


def test_reference_columns_shift_the_margin_exactly(tmp_path):
    """E_ref[g | x] from a column enters the dual as a constant: λ* with reference column c and margin b equals the
    sample-mean λ* at margin b + mean_i(c̄_i − ḡ_i) (an independent route through the plain MoCAN solve)."""
    import jax.numpy as jnp

    from bridge.tables import ConstraintSpec, load_scores
    from can_jax.solve import solve_dual

    rng = np.random.default_rng(0)
    n, k = 40, 6
    pid = np.repeat(np.arange(n), k)
    g = rng.normal(size=n * k)
    table = pa.table({"prompt_id": pid, "r": rng.normal(size=n * k) - 0.8 * g, "g": g,
                      "ref_g": rng.normal(0.1, 0.3, size=n * k)})  # fmt: skip
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    b = 0.2
    with_ref = load_scores(path, "r", [ConstraintSpec("g", b)], ref_columns={"g": "ref_g"})
    shift = (table["ref_g"].to_numpy().reshape(n, k).mean(1) - g.reshape(n, k).mean(1)).mean()
    plain = load_scores(path, "r", [ConstraintSpec("g", b + shift)])
    lam_ref = solve_dual(with_ref.scores, jnp.array([b]), 1.0).x
    lam_plain = solve_dual(plain.scores, jnp.array([b + shift]), 1.0).x
    assert float(lam_ref[0]) > 0.1
    np.testing.assert_allclose(lam_ref, lam_plain, rtol=1e-7)
    with pytest.raises(CanError, match="not constraints"):
        load_scores(path, "r", [ConstraintSpec("g", b)], ref_columns={"r": "ref_g"})


def test_prealign_records_beta_and_collect_reads_it(tiny_lm, tmp_path):
    from typer.testing import CliRunner

    from train.cli import app
    from train.collect import parse_aligned

    _, _, path = tiny_lm
    prefs = tmp_path / "safety.jsonl"
    rows = [{"prompt": p, "chosen": " no, that is not safe.", "rejected": " yes."} for p in PROMPTS]
    prefs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    runner = CliRunner()
    args = ["prealign", str(prefs), "--beta", "0.3", "--policy", str(path), "--out", str(tmp_path / "pre"),
            "--batch-size", "2", "--max-length", "48", "--lr", "1e-3"]  # fmt: skip
    res = runner.invoke(app, [*args, "--chat-template"])  # the tiny model has no template: one line, nothing run
    assert res.exit_code == 1 and "no chat template" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    policy = tmp_path / "pre" / "policy"
    record = json.loads((policy / "prealign.json").read_text())
    assert record["beta"] == 0.3 and len(record["preferences_sha256"]) == 64
    assert parse_aligned(f"safe={policy}") == ("safe", str(policy), 0.3)
    assert parse_aligned(f"safe={policy}@0.7")[2] == 0.7
    with pytest.raises(CanError, match="prealign.json"):
        parse_aligned(f"safe={tmp_path}")
    # A plain preference file carries no β: `can train` asks for one instead of guessing.
    res = runner.invoke(app, ["train", str(prefs), "--policy", str(path), "--out", str(tmp_path / "t")])
    assert res.exit_code == 1 and "give the DPO β" in res.output
