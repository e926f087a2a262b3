"""`can train`'s two savings over TRL's defaults (issue 12): it reuses the log π_ref that `can collect` recorded
instead of TRL's reference pass, only where TRL's own reference forward reproduces it (the independent reference is
TRL's pass itself); and its fused LM head scores only the completion positions on CPU (against the uncompacted
head and a direct log-softmax)."""

import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


@pytest.fixture(scope="module")
def prefs(tiny_lm, tmp_path_factory):
    from typer.testing import CliRunner

    from train.cli import app
    from train.collect import CollectConfig, collect

    _, _, path = tiny_lm
    tmp = tmp_path_factory.mktemp("refs")
    f = tmp / "prompts.txt"
    f.write_text("how do i bake bread?\ntell me a joke.\nis it safe to mix bleach?\nwhat is paris?\nhello\n")
    cfg = CollectConfig(prompts=str(f), policy=str(path), k=4, max_new_tokens=8,
                        scorers=["len=tests.train.toy_scorers:length", "safe=builtin:harmlessness"])  # fmt: skip
    scores = collect(cfg, tmp / "scores.parquet")
    runner = CliRunner()
    for args in (["dual", scores, "--reward", "len", "--constraint", "safe=0", "--beta", "1.0", "--out",
                  tmp / "cert.json"], ["label", scores, tmp / "cert.json", "--mode", "soft", "-o",
                                       tmp / "prefs.parquet"]):  # fmt: skip
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
    return tmp / "prefs.parquet", scores


def _trainer(path, tok, data, meta, tmp_path, name, **kw):
    from train.dpo import CanDPOTrainer, SoftPreferenceCollator, make_config

    args = make_config(tmp_path / name, meta.beta, "fp32", per_device_train_batch_size=4, **kw)
    return CanDPOTrainer(model=str(path), ref_model=None, args=args, train_dataset=data, processing_class=tok,
                         data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id,
                                                              max_length=args.max_length))  # fmt: skip


def _refs(trainer):
    ds = trainer.train_dataset
    return torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]], dtype=torch.float64)


def test_stored_reference_log_probs_replace_trls_pass(prefs, tiny_lm, tmp_path, monkeypatch):
    from trl import DPOTrainer

    from train.dpo import STORED_REFS, load_preferences

    _, tok, path = tiny_lm
    pairs = pq.read_table(prefs[0])
    assert set(STORED_REFS) <= set(pairs.column_names)
    data, meta = load_preferences(prefs[0])  # meta: the PreferenceSet
    assert len(data) > 4  # more than one batch: TRL's pass would take several forwards
    calls = []
    real = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))

    trl_pass = _refs(_trainer(path, tok, data.remove_columns(list(STORED_REFS)), meta, tmp_path, "trl"))
    assert len(calls) == -(-len(data) // 4)
    calls.clear()
    stored = _trainer(path, tok, data, meta, tmp_path, "stored")
    assert len(calls) == 1  # the check on the first batch, nothing more
    assert torch.allclose(_refs(stored), trl_pass, atol=1e-4)
    assert not set(STORED_REFS) & set(stored.train_dataset.column_names)
    stored.train()  # the soft-label loss runs on them

    # A stored value TRL's forward does not reproduce (another policy, bf16 autocast, …): TRL's pass runs.
    bad = data.map(lambda e, i: {STORED_REFS[0]: e[STORED_REFS[0]] + (0.5 if i == 0 else 0.0)}, with_indices=True)
    calls.clear()
    with pytest.warns(UserWarning, match="running TRL's reference pass"):
        fallback = _trainer(path, tok, bad, meta, tmp_path, "bad")
    assert torch.allclose(_refs(fallback), trl_pass, atol=1e-6)
    assert len(calls) == 1 + -(-len(data) // 4)


def test_pairs_cut_by_max_length_get_trls_pass(prefs, tiny_lm, tmp_path, monkeypatch):
    from trl import DPOTrainer

    from train.dpo import IDS, load_preferences

    _, tok, path = tiny_lm
    data, meta = load_preferences(prefs[0])  # meta: the PreferenceSet
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(*(data[c] for c in IDS), strict=True))
    shortest_prompt = min(len(p) for p in data["prompt_ids"])
    assert longest - 1 > shortest_prompt
    calls = []
    real = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cut = _trainer(path, tok, data, meta, tmp_path, "cut", max_length=longest - 1)
    n = len(cut.train_dataset)
    assert len(calls) == -(-n // 4)  # no check: straight to TRL's pass over the (cut) pairs
    ds = cut.train_dataset
    assert len(ds) == len(data)  # no prompt fills max_length: the rows line up
    cut_sides = [(got, want) for side in ("chosen", "rejected")
                 for p, c, got, want in zip(ds["prompt_ids"], ds[f"{side}_ids"], ds[f"ref_{side}_logps"],
                                            data.select(range(len(data)))[f"logp_ref_{side}"], strict=True)
                 if len(p) + len(c) > longest - 1]  # fmt: skip
    assert cut_sides and any(abs(g - w) > 1e-3 for g, w in cut_sides)  # TRL's values of the cut pairs, not ours


def test_the_fused_head_scores_only_completion_positions(prefs, tiny_lm, tmp_path, monkeypatch):
    """The coupling `train.dpo.compact_lm_head` rests on (trl.trainer.utils._use_triton, read by TRL's fused head at
    each call): inside it the head is applied to the completion positions only, and the per-token log-probs equal
    the uncompacted head's and a direct float64 log-softmax of the model's logits; a training step of
    CanDPOTrainer runs compacted."""
    import trl.trainer.utils as tu
    from trl.trainer.utils import add_fused_lm_head

    from train.dpo import compact_lm_head, load_preferences

    model, tok, path = tiny_lm
    rows = []
    real = tu._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *a):
            rows.append(hidden.shape[0])
            return real.apply(hidden, *a)

    monkeypatch.setattr(tu, "_ChunkedLogProbFunction", Spy)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path).eval()
    add_fused_lm_head(m)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt positions
    labels[1, :2] = -100
    with torch.no_grad():
        plain = m(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        with compact_lm_head():
            compact = m(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        direct = torch.log_softmax(m(input_ids=ids).logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert rows == [2 * 5, int((labels[:, 1:] != -100).sum())]  # every position, then the completion ones only
    mask = labels[:, 1:] != -100
    assert torch.allclose(compact, plain, atol=1e-6)
    assert torch.allclose(compact[mask].double(), direct[mask], atol=1e-5)

    data, meta = load_preferences(prefs[0])  # meta: the PreferenceSet
    trainer = _trainer(path, tok, data, meta, tmp_path, "compact", max_steps=1)
    rows.clear()
    trainer.train()
    batch_positions = 8 * (max(len(p) + max(len(c), len(r)) for p, c, r in
                               zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])) - 1)  # fmt: skip
    assert rows and all(r < batch_positions for r in rows)


def test_only_exact_recorded_log_probs_travel_to_the_pairs(tiny_lm, tmp_path):
    """`can label` carries logp_ref into the pairs only when collect says it is log π_ref of exactly the sampled
    ids, uncut, under the float32 policy: a --max-length collection (the pass, cut) gives pairs without it."""
    from typer.testing import CliRunner

    from train.cli import app
    from train.collect import CollectConfig, collect
    from train.dpo import STORED_REFS

    _, _, path = tiny_lm
    f = tmp_path / "prompts.txt"
    f.write_text("how do i bake bread?\ntell me a joke.\n")
    scorers = ["len=tests.train.toy_scorers:length", "safe=builtin:harmlessness"]
    for name, kw in (("exact", {}), ("cut", {"max_length": 12})):
        cfg = CollectConfig(prompts=str(f), policy=str(path), k=3, max_new_tokens=8, scorers=scorers, **kw)
        scores = collect(cfg, tmp_path / f"{name}.parquet")
        for args in (["dual", scores, "--reward", "len", "--constraint", "safe=0", "--beta", "1.0", "--out",
                      tmp_path / f"{name}.json"], ["label", scores, tmp_path / f"{name}.json", "-o",
                                                   tmp_path / f"{name}-prefs.parquet"]):  # fmt: skip
            res = CliRunner().invoke(app, [str(a) for a in args])
            assert res.exit_code == 0, res.output
        carried = set(STORED_REFS) <= set(pq.read_schema(tmp_path / f"{name}-prefs.parquet").names)
        assert carried == (name == "exact")


def test_a_failing_check_falls_back_to_trls_pass(prefs, tiny_lm, tmp_path, monkeypatch):
    from train.dpo import CanDPOTrainer, load_preferences

    _, tok, path = tiny_lm
    data, meta = load_preferences(prefs[0])  # meta: the PreferenceSet

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(CanDPOTrainer, "_stored_refs_check", boom)
    with pytest.warns(UserWarning, match="out of memory"):
        trainer = _trainer(path, tok, data, meta, tmp_path, "boom")
    assert torch.isfinite(_refs(trainer)).all()


def test_nan_logits_stop_sampling_with_one_line(tiny_lm):
    from transformers import AutoModelForCausalLM

    from can_jax.errors import CanError
    from train.sampling import sample_ids

    _, tok, path = tiny_lm
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(CanError, match="NaN or inf"):
        sample_ids(model, [tok("hello")["input_ids"]], 2, 3, [tok.eos_token_id], tok.pad_token_id)
