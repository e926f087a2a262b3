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
                  tmp / "cert.json"], ["label", scores, tmp / "cert.json", "--mode", "soft",
                                       "--pairs-per-prompt", "4", "-o", tmp / "prefs.parquet"]):  # fmt: skip
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
    return tmp / "prefs.parquet", scores


def _trainer(path, tok, data, meta, tmp_path, name, **kw):
    from train.dpo import CanDPOTrainer, SoftPreferenceCollator, make_config

    args = make_config(tmp_path / name, meta.beta, "fp32", per_device_train_batch_size=4, **kw)
    return CanDPOTrainer(model=str(path), ref_model=None, args=args, train_dataset=data, processing_class=tok,
                         data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id,
                                                              max_length=args.max_length))  # fmt: skip


def _refs(trainer_or_data):
    ds = getattr(trainer_or_data, "train_dataset", trainer_or_data)
    return torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]], dtype=torch.float64)


def _trls_pass(trainer):
    """TRL's own reference pass (one forward per pair side) over the trainer's prepared pairs."""
    from trl import DPOTrainer

    ds = trainer.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    return _refs(DPOTrainer._precompute_ref_logps(trainer, ds, "check", 4))


def _distinct_rows(data) -> int:
    """Sequences one forward per distinct (prompt, response) takes: the distinct ones, plus one for each prompt with
    an odd number of them (the forward takes them two by two)."""
    from collections import Counter

    from train.dpo import IDS

    seqs = {(tuple(p), tuple(x)) for p, c, r in zip(*(data[c] for c in IDS), strict=True) for x in (c, r)}
    return len(seqs) + sum(n % 2 for n in Counter(p for p, _ in seqs).values())


def _count_rows(monkeypatch):
    from trl import DPOTrainer

    rows = []
    real = DPOTrainer.compute_ref_log_probs
    monkeypatch.setattr(DPOTrainer, "compute_ref_log_probs",
                        lambda self, model, batch: rows.append(batch["input_ids"].shape[0]) or real(self, model, batch))
    return rows


def test_stored_reference_log_probs_replace_trls_pass(prefs, tiny_lm, tmp_path, monkeypatch):
    from train.dpo import STORED_REFS, load_preferences

    _, tok, path = tiny_lm
    pairs = pq.read_table(prefs[0])
    assert set(STORED_REFS) <= set(pairs.column_names)
    data, meta = load_preferences(prefs[0])  # meta: the PreferenceSet
    assert len(data) > 4  # more than one batch: TRL's pass would take several forwards
    calls = _count_rows(monkeypatch)

    recomputed = _trainer(path, tok, data.remove_columns(list(STORED_REFS)), meta, tmp_path, "trl")
    assert sum(calls) == _distinct_rows(data) < 2 * len(data)  # each distinct response once, not each pair side
    trl_pass = _trls_pass(recomputed)
    assert torch.allclose(_refs(recomputed), trl_pass, atol=1e-5)
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
    assert torch.allclose(_refs(fallback), trl_pass, atol=1e-5)
    assert calls[0] == 2 * min(4, len(data)) and sum(calls[1:]) == _distinct_rows(data)  # the check, then the pass


def test_pairs_cut_by_max_length_get_trls_pass(prefs, tiny_lm, tmp_path, monkeypatch):
    from train.dpo import IDS, load_preferences

    _, tok, path = tiny_lm
    data, meta = load_preferences(prefs[0])  # meta: the PreferenceSet
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(*(data[c] for c in IDS), strict=True))
    shortest_prompt = min(len(p) for p in data["prompt_ids"])
    assert longest - 1 > shortest_prompt
    calls = _count_rows(monkeypatch)
    cut = _trainer(path, tok, data, meta, tmp_path, "cut", max_length=longest - 1)
    assert sum(calls) == _distinct_rows(data)  # no check: straight to the reference pass over the (cut) pairs
    assert torch.allclose(_refs(cut), _trls_pass(cut), atol=1e-5)
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


def test_bf16_reference_pass_runs_once_per_distinct_response_and_starts_at_log_2(prefs, tiny_lm, tmp_path,
                                                                                  monkeypatch):
    """Under bf16 autocast the recorded log π_ref are not this trainer's (refused by the check): the reference forward
    runs in the trainer's own precision, once per distinct response, and at step 0 (policy = reference) the DPO loss
    of every batch is log 2, as it is with TRL's per-pair pass."""
    import math

    from train.dpo import CanDPOTrainer, SoftPreferenceCollator, load_preferences, make_config

    _, tok, path = tiny_lm
    data, meta = load_preferences(prefs[0])
    calls = _count_rows(monkeypatch)
    args = make_config(tmp_path / "bf16", meta.beta, "bf16", per_device_train_batch_size=4)
    assert args.bf16
    trainer = CanDPOTrainer(model=str(path), ref_model=None, args=args, train_dataset=data, processing_class=tok,
                            data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id,
                                                                 max_length=args.max_length))  # fmt: skip
    assert sum(calls) == _distinct_rows(data) < 2 * len(data)  # no check under bf16: straight to the pass
    model = trainer.model.eval()
    losses = []
    for batch in trainer.get_train_dataloader():
        with torch.no_grad(), trainer.accelerator.autocast():
            losses.append(float(trainer.compute_loss(model, batch)))
    assert len(losses) == -(-len(data) // 4)
    # 1e-5, well inside the 1e-3 asked: a float32 reference under this bf16 policy is already ~1e-4 off here.
    assert max(abs(x - math.log(2)) for x in losses) < 1e-5, losses
