"""One tokenisation path and exact samples of π_ref, on tiny stand-ins of real families (issue 9; tests/train/zoo.py).

The independent reference for log π_ref is the log-probability of the sampled ids from one unpadded forward pass
on exactly those ids; TRL's own DPO forward on the stored pair must give the same number.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

from can_jax.errors import CanError  # noqa: E402

TEXT_PROMPTS = ["how do i bake bread?", "tell me a joke.", "  is it safe to mix bleach?  "]
CONVERSATION = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " hi there "},
                {"role": "user", "content": "what is the capital of france?"}]  # fmt: skip


@pytest.fixture(scope="module")
def zoo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {name: (root / name, *zoo.build(name, root / name)) for name in zoo.FAMILIES}


def _collect(path, tmp_path, prompts, name="scores", **kw):
    from train.collect import CollectConfig, collect

    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    scorers = ["len=tests.train.toy_scorers:length", "safe=builtin:politeness"]
    cfg = CollectConfig(prompts=str(f), policy=str(path), scorers=scorers, k=3,
                        max_new_tokens=kw.pop("max_new_tokens", 8), batch_size=4, shard_size=2, **kw)  # fmt: skip
    return collect(cfg, tmp_path / f"{name}.parquet")


def _direct_logp(model, p_ids, r_ids) -> float:
    """Σ log p(r_t | prompt, r_<t) from one forward pass over exactly these ids (no padding, no batching)."""
    ids = torch.tensor([list(p_ids) + list(r_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(lp[len(p_ids) + t - 1, tok] for t, tok in enumerate(r_ids)))


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_logp_ref_is_the_logprob_of_the_sampled_ids(family, zoo_dirs, tmp_path):
    from trl import DPOConfig

    from train.dpo import CanDPOTrainer

    path, model, tok = zoo_dirs[family]
    fam = zoo.FAMILIES[family]
    prompts = TEXT_PROMPTS + ([CONVERSATION] if fam.template else [])
    table = pq.read_table(_collect(path, tmp_path, prompts))
    rows = table.to_pylist()
    assert len(rows) == 3 * len(prompts)
    for r in rows:
        assert r["logp_ref"] == pytest.approx(_direct_logp(model, r["prompt_ids"], r["response_ids"]), abs=1e-4)
        if fam.bos:  # one BOS, where the tokenizer (and the template) puts it: never two
            bos = tok.convert_tokens_to_ids(fam.bos)
            assert r["prompt_ids"][0] == bos and r["prompt_ids"].count(bos) == 1
        if fam.template:  # prompts go through the template (text prompts as one-turn conversations)
            assert isinstance(r["prompt"], list) and r["prompt"][-1]["role"] == "user"
        from train.sampling import stop_ids

        stops = stop_ids(model, tok)
        assert r["finished"] == (r["response_ids"][-1] in stops)
        assert not any(t in stops for t in r["response_ids"][:-1])
    # TRL's DPO forward on the stored pairs (the ids, through CanDPOTrainer) computes the same log-probs.
    from datasets import Dataset

    a, b = rows[0::3], rows[1::3]  # two responses of the same prompt (K = 3, prompt-major)
    assert all(x["prompt_id"] == y["prompt_id"] for x, y in zip(a, b, strict=True))
    pairs = {"prompt": [r["prompt"] for r in a], "chosen": [r["response"] for r in a],
             "rejected": [r["response"] for r in b], "prompt_ids": [r["prompt_ids"] for r in a],
             "chosen_ids": [r["response_ids"] for r in a], "rejected_ids": [r["response_ids"] for r in b]}  # fmt: skip
    expect = {(tuple(x["response_ids"]), tuple(y["response_ids"])): (x["logp_ref"], y["logp_ref"])
              for x, y in zip(a, b, strict=True)}  # fmt: skip
    if fam.template:  # conversational pairs, as `can label` writes them
        for side in ("chosen", "rejected"):
            pairs[side] = [[{"role": "assistant", "content": c}] for c in pairs[side]]
    cfg = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=True, bf16=False, per_device_train_batch_size=64,
                    max_length=512, loss_type=["sigmoid"], report_to=[], beta=0.5)  # fmt: skip
    trainer = CanDPOTrainer(model=str(path), ref_model=None, args=cfg, train_dataset=Dataset.from_dict(pairs),
                            processing_class=tok)  # fmt: skip
    assert trainer.train_dataset["chosen_ids"] == pairs["chosen_ids"]  # not re-tokenised from the text
    batch = next(iter(trainer.get_train_dataloader()))
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    half = len(batch["input_ids"]) // 2
    got = 0
    for i in range(half):
        mask = batch["completion_mask"][i].bool()
        c = tuple(batch["input_ids"][i][mask].tolist())
        mask_r = batch["completion_mask"][half + i].bool()
        rj = tuple(batch["input_ids"][half + i][mask_r].tolist())
        want = expect[(c, rj)]
        assert ref_c[i].item() == pytest.approx(want[0], abs=1e-4)
        assert ref_r[i].item() == pytest.approx(want[1], abs=1e-4)
        got += 1
    assert got == len(pairs["prompt"])


def test_text_rendered_template_would_add_a_second_bos(zoo_dirs):
    """The quirk the one path avoids: Llama-3/Gemma templates start with {{ bos_token }}, and their tokenizers add
    BOS to text — rendering to text and tokenising again gives two."""
    from train.tokens import prompt_ids

    for family in ("llama3", "gemma"):
        _, _, tok = zoo_dirs[family]
        conv = [{"role": "user", "content": "hello"}]
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2
        assert prompt_ids(tok, conv)[:2] != [tok.bos_token_id] * 2


def test_non_retokenizing_samples_are_detected_counted_and_trained_on_their_ids(zoo_dirs, tmp_path):
    """Qwen2.5's template appends "\\n" after <|im_end|>, and truncated samples get an EOS appended by TRL's text
    rule: the text pair would not re-tokenise to the sampled ids. Such samples are counted and flagged; the rule is
    that they keep and train on their sampled ids."""
    from bridge.scores_table import collect_record
    from train.tokens import text_pair_ids

    path, _, tok = zoo_dirs["qwen2_5"]
    out = _collect(path, tmp_path, TEXT_PROMPTS, max_new_tokens=4)
    table = pq.read_table(out)
    rows = table.to_pylist()
    meta = collect_record(out).meta
    flags = [text_pair_ids(tok, r["prompt"], [{"role": "assistant", "content": r["response"]}])
             == (r["prompt_ids"], r["response_ids"]) for r in rows]  # fmt: skip
    assert [r["retokenizes"] for r in rows] == flags
    assert meta["not_retokenizing"] == flags.count(False) > 0
    assert meta["unfinished"] == sum(not r["finished"] for r in rows)


def _chi2_pvalue(samples: list[tuple], probs: dict[tuple, float]) -> float:
    """Pearson χ² of sampled sequences against exact probabilities (the most likely sequences, the rest pooled)."""
    from scipy.stats import chisquare

    n = len(samples)
    top = [s for s, p in sorted(probs.items(), key=lambda kv: -kv[1]) if p * n >= 10][:15]
    counts = [sum(s == t for s in samples) for t in top]
    expected = [probs[t] * n for t in top]
    counts.append(n - sum(counts))
    expected.append(n - sum(expected))
    return float(chisquare(counts, expected).pvalue)


@pytest.mark.parametrize("family", ["qwen2_5", "plain"])
def test_samples_follow_pi_ref_whatever_the_generation_config(family, zoo_dirs):
    """Two-token samples against their exact probabilities p(t1)·p(t2|t1) from plain forward passes: the sampler
    fits them; `generate()` with the shipped generation_config (top-k, temperature, repetition penalty) visibly
    does not — the config would change the samples."""
    from train.sampling import sample_ids
    from train.tokens import prompt_ids

    path, model, tok = zoo_dirs[family]
    p = [{"role": "user", "content": "tell me a joke."}] if zoo.FAMILIES[family].template else "tell me a joke."
    ids = prompt_ids(tok, p)
    n = 3000
    gen = torch.Generator().manual_seed(0)
    drawn = sample_ids(model, [ids], n, 2, stop=[], pad_id=tok.pad_token_id, batch_size=1000, generator=gen)
    ours = [tuple(s) for s in drawn.ids[0]]
    with torch.no_grad():
        lp1 = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        probs = {}
        for t1 in torch.topk(lp1, 30).indices.tolist():
            lp2 = torch.log_softmax(model(input_ids=torch.tensor([ids + [t1]])).logits[0, -1].double(), -1)
            for t2 in torch.topk(lp2, 30).indices.tolist():
                probs[(t1, t2)] = float((lp1[t1] + lp2[t2]).exp())
    assert _chi2_pvalue(ours, probs) > 1e-3
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=2, min_new_tokens=2, num_return_sequences=n,
                             do_sample=True, pad_token_id=tok.pad_token_id)  # fmt: skip
    theirs = [tuple(s) for s in out[:, len(ids) :].tolist()]
    assert _chi2_pvalue(theirs, probs) < 1e-6


def test_conversational_prompts_need_a_template(zoo_dirs, tmp_path):
    path = zoo_dirs["plain"][0]
    with pytest.raises(CanError, match="chat template"):
        _collect(path, tmp_path, [CONVERSATION])
    f = tmp_path / "bad.jsonl"
    for line, msg in [('{"prompt": []}', "prompt is text or a list"), ('{"x": 1}', 'no "prompt"'),
                      ('{"prompt": [{"role": "user"}]}', "list of"), ("{", "not JSON")]:  # fmt: skip
        f.write_text(line + "\n")
        from train.collect import read_prompts

        with pytest.raises(CanError, match=msg):
            read_prompts(f)


def test_collect_cli_refuses_conversations_without_template_in_one_line(zoo_dirs, tmp_path):
    from typer.testing import CliRunner

    from train.cli import app

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": CONVERSATION}) + "\n")
    out = tmp_path / "s.parquet"
    res = CliRunner().invoke(app, ["collect", str(f), "--policy", str(zoo_dirs["plain"][0]), "-o", str(out),
                                   "-s", "len=tests.train.toy_scorers:length"])  # fmt: skip
    assert res.exit_code == 1
    assert "chat template" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_a_conversation_the_template_refuses_is_named_by_file_and_line(zoo_dirs, tmp_path):
    """Issue 24: Gemma's template raises on roles that do not alternate; the refusal names the file and line."""
    from typer.testing import CliRunner

    from train.cli import app

    f = tmp_path / "p.jsonl"
    twice = [{"role": "user", "content": "hello"}, {"role": "user", "content": "again"}]
    f.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": twice}) + "\n")
    res = CliRunner().invoke(app, ["collect", str(f), "--policy", str(zoo_dirs["gemma"][0]), "-o",
                                   str(tmp_path / "s.parquet"), "-s", "n=tests.train.toy_scorers:length"])  # fmt: skip
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {f} line 2: ") and "chat template refuses" in line, line


def test_identity_holds_through_label_and_train_on_llama3(zoo_dirs, tmp_path):
    """collect → dual → label → train on the Llama-3 stand-in: the pairs carry the sampled ids and DPO's reference
    log-probs (TRL's precomputed ref_chosen_logps) equal the collected logp_ref."""
    from typer.testing import CliRunner

    from train.cli import app

    path, model, tok = zoo_dirs["llama3"]
    scores = _collect(path, tmp_path, TEXT_PROMPTS + [CONVERSATION, "what is paris?"])
    runner = CliRunner()
    cert = tmp_path / "cert.json"
    res = runner.invoke(app, ["dual", str(scores), "--reward", "len", "--constraint", "safe=0", "--beta", "1.0",
                               "--out", str(cert)])  # fmt: skip
    assert res.exit_code == 0, res.output
    prefs = tmp_path / "prefs.parquet"
    res = runner.invoke(app, ["label", str(scores), str(cert), "--mode", "soft", "-o", str(prefs)])
    assert res.exit_code == 0, res.output
    pt = pq.read_table(prefs).to_pylist()
    table = pq.read_table(scores).to_pylist()
    by_ids = {tuple(r["response_ids"]): r for r in table}
    for p in pt:
        assert p["prompt_ids"] == by_ids[tuple(p["chosen_ids"])]["prompt_ids"]
        assert p["chosen"][0]["role"] == "assistant"  # conversational pairs stay conversational
    from train.dpo import CanDPOTrainer, SoftPreferenceCollator, load_preferences, make_config

    data, meta = load_preferences(prefs)
    data = data.remove_columns(["logp_ref_chosen", "logp_ref_rejected"])  # TRL's own reference pass, then
    args = make_config(tmp_path / "run", meta.beta, "fp32", max_length=512, per_device_train_batch_size=4)
    trainer = CanDPOTrainer(model=str(path), ref_model=None, args=args, train_dataset=data, processing_class=tok,
                            data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id))  # fmt: skip
    ds = trainer.train_dataset
    for c_ids, r_ids, rc, rr in zip(ds["chosen_ids"], ds["rejected_ids"], ds["ref_chosen_logps"],
                                    ds["ref_rejected_logps"], strict=True):  # fmt: skip
        assert rc == pytest.approx(by_ids[tuple(c_ids)]["logp_ref"], abs=1e-4)
        assert rr == pytest.approx(by_ids[tuple(r_ids)]["logp_ref"], abs=1e-4)
    assert np.isfinite(ds["ref_chosen_logps"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_every_stage_runs_on_each_family(family, zoo_dirs, tmp_path):
    """collect → dual → label → train → evaluate, logratios and prealign through the CLI on each stand-in; the
    log-probs `logratios` recomputes from the stored ids equal the collected logp_ref."""
    from typer.testing import CliRunner

    from train.cli import app

    path, _, _ = zoo_dirs[family]
    fam = zoo.FAMILIES[family]
    runner = CliRunner()

    def run(*args):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    prompts = TEXT_PROMPTS[:2] + ([CONVERSATION] if fam.template else ["what is paris?"])
    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    scorers = ["-s", "len=tests.train.toy_scorers:length", "-s", "safe=builtin:politeness"]
    scores, cert, prefs = tmp_path / "scores.parquet", tmp_path / "cert.json", tmp_path / "prefs.parquet"
    out = run("collect", pfile, "--policy", path, "-o", scores, "--k", 3, "--max-new-tokens", 6, *scorers)
    assert "re-tokenise" in out
    run("dual", scores, "--reward", "len", "--constraint", "safe=0", "--beta", 1.0, "--out", cert)
    run("label", scores, cert, "--mode", "soft", "--pairs-per-prompt", 2, "-o", prefs)
    run("train", prefs, "--policy", path, "--out", tmp_path / "run", "--batch-size", 4, "--lr", 1e-3,
        "--precision", "fp32", "--max-length", 256)  # fmt: skip
    policy = tmp_path / "run" / "policy"
    run("evaluate", policy, cert, pfile, *scorers, "--reference", path, "--k", 2, "--max-new-tokens", 4,
        "--out", tmp_path / "eval", "--train-scores", scores, "--allow-training-prompts")  # fmt: skip
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert {r["name"] for r in report["rows"]} == {"len", "safe"}
    run("logratios", scores, "-a", f"new={policy}@0.5", "--policy", path, "-o", tmp_path / "pecan.parquet")
    t = pq.read_table(tmp_path / "pecan.parquet").to_pandas()
    np.testing.assert_allclose(t["logp_ref"], pq.read_table(scores).column("logp_ref").to_numpy(), atol=1e-4)
    assert np.isfinite(t["new"]).all() and (t["new"] != 0).any()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": " no, never.", "rejected": " yes."}) + "\n"
                             for p in TEXT_PROMPTS))  # fmt: skip
    template = ["--chat-template"] if fam.template else []
    run("prealign", pairs, "--beta", 0.3, "--policy", path, "--out", tmp_path / "pre", "--batch-size", 2,
        "--max-length", 128, *template)  # fmt: skip
    assert json.loads((tmp_path / "pre" / "policy" / "prealign.json").read_text())["beta"] == 0.3


def test_text_pairs_take_the_template_and_ids_need_their_tokenizer(zoo_dirs, tmp_path):
    """`can train` on text pairs (e.g. relabelled PKU pairs) renders them as `can collect` did: one-turn
    conversations when the policy has a template (auto), as written with --no-chat-template; pairs of sampled ids
    are refused by a policy with another tokenizer."""
    from datasets import Dataset

    from train.dpo import TrainConfig, _apply_chat_template, run

    _, _, tok = zoo_dirs["llama3"]
    text = Dataset.from_dict({"prompt": ["hi?"], "chosen": ["a"], "rejected": ["b"]})
    conv = _apply_chat_template(text, tok, "llama3", None)
    assert conv["prompt"][0] == [{"role": "user", "content": "hi?"}]
    assert conv["chosen"][0] == [{"role": "assistant", "content": "a"}]
    assert _apply_chat_template(text, tok, "llama3", False)["prompt"][0] == "hi?"
    plain_tok = zoo_dirs["plain"][2]
    assert _apply_chat_template(text, plain_tok, "plain", None)["prompt"][0] == "hi?"
    with pytest.raises(CanError, match="no chat template"):
        _apply_chat_template(text, plain_tok, "plain", True)
    # Pairs labelled from a llama3 collection, trained with the qwen2_5 stand-in: refused before any training.
    from typer.testing import CliRunner

    from train.cli import app

    scores = _collect(zoo_dirs["llama3"][0], tmp_path, TEXT_PROMPTS)
    runner = CliRunner()
    cert, prefs = tmp_path / "cert.json", tmp_path / "prefs.parquet"
    assert runner.invoke(app, ["dual", str(scores), "--reward", "len", "--constraint", "safe=0", "--beta", "1",
                               "--out", str(cert)]).exit_code == 0  # fmt: skip
    assert runner.invoke(app, ["label", str(scores), str(cert), "-o", str(prefs)]).exit_code == 0
    with pytest.raises(CanError, match="another tokenizer"):
        run(TrainConfig(preferences=str(prefs), policy=str(zoo_dirs["qwen2_5"][0]), out=str(tmp_path / "run")))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_prompts_are_sampled_from_their_own_distribution(arch, zoo_dirs):
    """A short prompt batched with a long one is left-padded and its KV cache expanded K times: its samples must
    still follow its own p(t1)·p(t2|t1) from unpadded forward passes — for rotary (Llama) and for learned absolute
    positions (GPT-2), where a position shifted by the padding would change every probability."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.sampling import sample_ids
    from train.tokens import prompt_ids

    _, base, tok = zoo_dirs["plain"]
    torch.manual_seed(4)
    if arch == "llama":  # the plain stand-in's architecture, with a head scale that leaves mass on many tokens
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(base.config)
        with torch.no_grad():
            model.lm_head.weight.mul_(6.0)
        model.eval()
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=4))
        with torch.no_grad():
            model.lm_head.weight.mul_(6.0)  # tied to the embeddings: sharper next-token distributions
        model.eval()
    short = prompt_ids(tok, "tell me a joke.")
    long = prompt_ids(tok, "is it safe to mix bleach and ammonia? no, never mix them: the fumes are toxic.")
    assert len(long) > len(short) + 5
    n = 4000
    drawn = sample_ids(model, [long, short], n, 2, stop=[], pad_id=tok.pad_token_id, batch_size=2 * n,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        lp1 = torch.log_softmax(model(input_ids=torch.tensor([short])).logits[0, -1].double(), -1)
        probs = {}
        for t1 in torch.topk(lp1, 20).indices.tolist():
            lp2 = torch.log_softmax(model(input_ids=torch.tensor([short + [t1]])).logits[0, -1].double(), -1)
            for t2 in torch.topk(lp2, 20).indices.tolist():
                probs[(t1, t2)] = float((lp1[t1] + lp2[t2]).exp())
    if sum(p * n >= 10 for p in probs.values()) >= 3:  # two-token sequences with mass enough for χ²
        assert _chi2_pvalue([tuple(s) for s in drawn.ids[1]], probs) > 1e-3
    # The first token alone, over every token with mass: the position of the prompt's end under padding.
    first = {(t,): float(lp1[t].exp()) for t in range(len(lp1))}
    assert sum(p * n >= 10 for p in first.values()) >= 8  # a distribution with enough mass to test
    assert _chi2_pvalue([(s[0],) for s in drawn.ids[1]], first) > 1e-3
