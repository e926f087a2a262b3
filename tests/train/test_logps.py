import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


def test_sequence_logps_equal_trl_dpo_reference_logps(tiny_lm, tmp_path):
    """Our log-probs must be exactly what TRL's DPO computes for the same pairs (DESIGN §5b)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from train.logps import sequence_logps

    model, tok, path = tiny_lm
    data = {
        "prompt": ["how do i bake bread?", "is it safe to mix bleach and ammonia?", "tell me a joke."],
        "chosen": [" mix flour and water.", " no, never.", " why did the chicken cross the road?"],
        "rejected": [" bake it.", " yes.", " paris is the capital of france, a long answer here."],
    }
    cfg = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=3,
                    max_length=48, loss_type=["sigmoid"], report_to=[], beta=0.5)  # fmt: skip
    # ref_model=None makes TRL reload the reference from the model's path: give it the saved copy.
    trainer = DPOTrainer(model=str(path), ref_model=None, args=cfg, train_dataset=Dataset.from_dict(data),
                         processing_class=tok)  # fmt: skip
    assert len(trainer.train_dataset) == 3
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    ours_c = sequence_logps(model, tok, data["prompt"], data["chosen"], max_length=48)
    ours_r = sequence_logps(model, tok, data["prompt"], data["rejected"], max_length=48)
    # The dataloader may reorder examples: compare as sets of pairs.
    trl_pairs = sorted(zip(ref_chosen.tolist(), ref_rejected.tolist()))
    our_pairs = sorted(zip(ours_c.tolist(), ours_r.tolist()))
    for (a, b), (c, d) in zip(trl_pairs, our_pairs, strict=True):
        assert a == pytest.approx(c, abs=1e-4) and b == pytest.approx(d, abs=1e-4)


def test_sequence_logps_by_hand_and_batch_size_invariant(tiny_lm):
    from train.logps import sequence_logps, tokenize_completion

    model, tok, _ = tiny_lm
    prompts = ["what is the capital of france?", "hello"]
    completions = [" paris.", " hi there, how can i help?"]
    got = sequence_logps(model, tok, prompts, completions, batch_size=1)
    assert torch.allclose(got, sequence_logps(model, tok, prompts, completions, batch_size=2), atol=1e-5)
    # Independent: token-by-token with no padding, via the chain rule over the completion tokens.
    p_ids, c_ids = tokenize_completion(tok, prompts[1], completions[1])
    assert c_ids[-1] == tok.eos_token_id  # EOS appended, as TRL's DPO preprocessing does
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    total = sum(torch.log_softmax(logits[len(p_ids) + i - 1], -1)[t].item() for i, t in enumerate(c_ids))
    assert got[1].item() == pytest.approx(total, abs=1e-4)
