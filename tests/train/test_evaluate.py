"""The reweighted gains behind `can evaluate --train-scores` and PeCAN's implied gains, against NumPy."""

import numpy as np
import pytest

pytest.importorskip("torch")


def test_tilt_gains_match_numpy_self_normalised_weights():
    import jax

    jax.config.update("jax_enable_x64", True)
    from can_jax.certify import tilt_gains

    rng = np.random.default_rng(0)
    n, k, m, beta = 30, 5, 2, 0.7
    ids = np.repeat(rng.permutation(n) * 7 + 3, k)  # arbitrary, non-contiguous prompt ids
    s = rng.normal(size=n * k)
    g = rng.normal(size=(n * k, m))
    w = np.exp(s.reshape(n, k) / beta)
    w /= w.sum(1, keepdims=True)
    expect = ((w[..., None] * g.reshape(n, k, m)).sum(1) - g.reshape(n, k, m).mean(1)).mean(0)
    np.testing.assert_allclose(tilt_gains(ids, s, g, beta), expect, rtol=1e-10)


def test_insample_gains_are_zero_for_the_reference_itself(tiny_lm, tmp_path):
    from train.collect import CollectConfig, collect
    from train.evaluate import insample_gains

    _, _, path = tiny_lm
    f = tmp_path / "p.txt"
    f.write_text("hello\ntell me a joke.\n")
    cfg = CollectConfig(prompts=str(f), policy=str(path), scorers=["len=tests.train.toy_scorers:length"], k=3,
                        max_new_tokens=5)  # fmt: skip
    table = collect(cfg, tmp_path / "s.parquet")
    from bridge.tables import read_table

    assert insample_gains(str(path), read_table(table), ["len"])["len"] == pytest.approx(0.0, abs=1e-6)


def test_distinct_2_counts_unique_word_bigrams():
    from train.evaluate import distinct_2

    # bigrams: (a b) (b a) (a b) | (c d) → 3 unique of 4
    assert distinct_2(["a b a b", "C d"]) == pytest.approx(3 / 4)
    assert np.isnan(distinct_2(["one", ""]))


def test_text_check_against_the_samplers_own_logps(tiny_lm, other_lm, tmp_path):
    """log π_ref of the reference's samples, recomputed by `sample_logps`, equals the log-probs the sampler drew them
    with (an independent computation: the sampling loop's logits); KL of a policy to itself is 0, to another policy
    the mean log-ratio computed here directly with transformers."""
    import torch

    from train.evaluate import sample_logps, text_health
    from train.prompts import sample
    from train.tokens import as_prompts

    model, tok, path = tiny_lm
    other = other_lm[1]
    drawn = sample(model.eval(), tok, as_prompts(tok, ["hello", "tell me a joke."]), 3, 6, 8, seed=3)
    ids = list(zip(drawn["prompt_ids"], drawn["response_ids"], strict=True))
    lp, n = sample_logps(str(path), ids, 4)
    np.testing.assert_allclose(lp, drawn["logp"], atol=1e-4)
    assert list(n) == [len(r) for r in drawn["response_ids"]]
    texts = [drawn["response"][:3], drawn["response"][3:]]
    same = text_health(str(path), str(path), texts, texts, ids, ids, 4, "fp32")
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["logp_ref_per_token"]["aligned"] == pytest.approx(float(np.sum(drawn["logp"]) / n.sum()), abs=1e-5)
    quick = text_health(str(path), str(path), texts, texts, ids, ids, 4, "fp32", drawn["logp"], drawn["logp"])
    for key in ("logp_ref_per_token", "mean_tokens"):
        for who in ("aligned", "reference"):
            assert quick[key][who] == pytest.approx(same[key][who], abs=1e-5)
    assert quick["kl"] == pytest.approx(0.0, abs=1e-5)
    from transformers import AutoModelForCausalLM

    o = AutoModelForCausalLM.from_pretrained(other).eval()

    def direct(m, p, r):
        x = torch.tensor([p + r])
        with torch.no_grad():
            logits = m(input_ids=x).logits[0, len(p) - 1 : -1].log_softmax(-1)
        return float(logits[torch.arange(len(r)), torch.tensor(r)].sum())

    expect = np.mean([direct(o, p, r) - direct(model, p, r) for p, r in ids])
    health = text_health(str(other), str(path), texts, texts, ids, ids, 4, "fp32")
    assert health["kl"] == pytest.approx(expect, abs=1e-4)


def test_evaluate_says_so_when_training_moved_nothing(tiny_lm, tmp_path):
    """An "aligned" policy that is the reference draws the same samples: gains are exactly 0 and the report says
    why, instead of a bare +0.000 [+0.000, +0.000]."""
    from train.evaluate import EvaluateConfig, run

    _, _, path = tiny_lm

    class Cert:
        reward, names, kinds, beta, lam, margins = "len", [], [], 0.5, {}, {}
        predicted_gains, predicted_reward_gain = {}, 0.1

    cfg = EvaluateConfig(aligned=str(path), reference=str(path), scorers=("len=tests.train.toy_scorers:length",),
                         out=str(tmp_path / "e"), k=2, max_new_tokens=4)  # fmt: skip
    rep = run(cfg, Cert(), ["hello", "tell me a joke."])
    assert rep.identical_samples == 1.0 and "did not move" in rep.note
    assert rep.rows[0].achieved_gain == 0.0
    assert "did not move" in (tmp_path / "e" / "evaluation.md").read_text()


def test_reference_samples_are_reused_from_disk_for_the_same_inputs_only(tiny_lm, other_lm, tmp_path, monkeypatch):
    """π_ref's samples and scores on the held-out prompts come back from the file an earlier run kept, giving the
    report a fresh sampling gives; another seed, scorer or reference file, or a damaged file, samples again."""
    from dataclasses import replace

    import train.evaluate as ev

    monkeypatch.delenv("CAN_NO_CACHE", raising=False)  # the suite's switch for every cache: this test checks one
    monkeypatch.setenv("CAN_CACHE_DIR", str(tmp_path / "cache"))
    _, _, path = tiny_lm
    aligned = str(other_lm[1])
    drawn = []
    real = ev._policy_scores
    monkeypatch.setattr(ev, "_policy_scores", lambda spec, *a: drawn.append(spec) or real(spec, *a))

    class Cert:
        reward, names, kinds, beta, lam, margins = "len", [], [], 0.5, {}, {}
        predicted_gains, predicted_reward_gain = {}, 0.1

    prompts = ["hello", "tell me a joke.", "what is paris?"]
    cfg = ev.EvaluateConfig(aligned=aligned, reference=str(path), scorers=("len=tests.train.toy_scorers:length",),
                            out=str(tmp_path / "e"), k=3, max_new_tokens=5)  # fmt: skip

    def measured(c, expect_reference_sampled: bool):
        drawn.clear()
        report = ev.run(c, Cert(), prompts)
        assert drawn == [aligned, str(path)] if expect_reference_sampled else drawn == [aligned]
        return report

    first = measured(cfg, True)
    kept = list((tmp_path / "cache" / "reference-samples").glob("*.json"))
    assert len(kept) == 1
    again = measured(cfg, False)
    fresh = measured(replace(cfg, reuse_reference=False), True)
    for a, b in ((again, first), (fresh, first)):
        assert a.rows == b.rows and a.text == b.text and a.examples == b.examples
    measured(replace(cfg, seed=cfg.seed + 1), True)
    measured(replace(cfg, scorers=("len=tests.train.toy_scorers:e_share",)), True)
    (path / "notes.txt").write_text("another file in the reference's folder")
    try:
        measured(cfg, True)
    finally:
        (path / "notes.txt").unlink()
    measured(cfg, False)
    kept[0].write_text("{not json")
    assert measured(cfg, True).rows == first.rows
