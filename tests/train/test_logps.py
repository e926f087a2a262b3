import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


def test_sequence_logps_equal_trl_dpo_reference_logps(tiny_lm, tmp_path):
    """Our log-probs must be exactly what TRL's DPO computes for the same pairs (DESIGN §6)."""
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
    from train.logps import sequence_logps
    from train.tokens import text_pair_ids

    model, tok, _ = tiny_lm
    prompts = ["what is the capital of france?", "hello"]
    completions = [" paris.", " hi there, how can i help?"]
    got = sequence_logps(model, tok, prompts, completions, batch_size=1)
    assert torch.allclose(got, sequence_logps(model, tok, prompts, completions, batch_size=2), atol=1e-5)
    # Independent: token-by-token with no padding, via the chain rule over the completion tokens.
    p_ids, c_ids = text_pair_ids(tok, prompts[1], completions[1])
    assert c_ids[-1] == tok.eos_token_id  # EOS appended, as TRL's DPO preprocessing does
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    total = sum(torch.log_softmax(logits[len(p_ids) + i - 1], -1)[t].item() for i, t in enumerate(c_ids))
    assert got[1].item() == pytest.approx(total, abs=1e-4)


def _unchunked(ref, others, seqs):
    """Per sequence (prompt_ids, completion_ids), unpadded: Σ log p of the completion under `ref` and each of
    `others`, and Σ_t KL(ref ‖ other), from the models' own full [T, V] logits in float64 — the plain reference."""
    lp_ref, lp, kl = [], [], []
    for p, c in seqs:
        ids = torch.tensor([p + c])
        with torch.no_grad():
            a = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)[len(p) - 1 : -1]  # [len(c), V]
            bs = [torch.log_softmax(o(input_ids=ids).logits[0].double(), -1)[len(p) - 1 : -1] for o in others]
        tgt = torch.tensor(c)[:, None]
        lp_ref.append(float(a.gather(1, tgt).sum()))
        lp.append([float(b.gather(1, tgt).sum()) for b in bs])
        kl.append([float((a.exp() * (a - b)).sum()) for b in bs])
    return (
        torch.tensor(lp_ref, dtype=torch.float64),
        torch.tensor(lp, dtype=torch.float64),
        torch.tensor(kl, dtype=torch.float64),
    )


SEQS = [([1, 5, 9, 12], [40, 41, 2]), ([1, 7], [100, 3, 17, 29, 2]), ([1, 5, 9, 12, 60, 61, 62], [8]),
        ([1, 200, 201], [90, 91, 92, 93, 94, 95, 96])]  # fmt: skip


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 300 * 3, 64 << 20])  # one position, 3 positions, all at once
def test_chunked_logps_and_kl_equal_the_unchunked_computation(tiny_lm, other_lm, chunk_bytes):
    """Issue 12: log-softmax + gather over blocks of positions give the full-vocabulary results (float64, one
    unpadded sequence at a time, from the models' own logits), whatever the block size."""
    from train.logps import logps_and_kl

    model, tok, _ = tiny_lm
    other = other_lm[0]
    want = _unchunked(model, [other, model], SEQS)
    got = logps_and_kl(model, [other, model], tok, None, None, batch_size=3, ids=SEQS, chunk_bytes=chunk_bytes)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g.double(), w.double(), atol=2e-5, rtol=1e-5)


def test_full_vocabulary_blocks_are_bounded_whatever_the_vocabulary(tiny_lm):
    """Peak memory by construction: with a 32k vocabulary, every float32 logits block the pass makes is at most
    `chunk_rows` positions × V (within the byte budget), and the LM head module never sees a [B, T, H] batch
    (only the four-token check of `head_matches`) — no [batch, length, vocab] tensor exists."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import train.logps as L

    _, tok, _ = tiny_lm
    torch.manual_seed(0)
    big = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32000,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    budget = 4 * 32000 * 2  # two positions per block
    shapes, head_calls = [], []
    spy = L.head_logits

    def recording(model, hidden):
        out = spy(model, hidden)
        shapes.append(tuple(out.shape))
        return out

    hook = big.get_output_embeddings().register_forward_hook(lambda m, i, o: head_calls.append(tuple(i[0].shape)))
    try:
        L.head_logits = recording
        got = L.logps_and_kl(big, [big], tok, None, None, batch_size=4, ids=SEQS, chunk_bytes=budget)
    finally:
        L.head_logits = spy
        hook.remove()
    assert [s for s in shapes if len(s) != 2] == [(1, 4, 32000)]  # the head check of `head_matches`, once
    shapes = [s for s in shapes if len(s) == 2]
    n_completion = sum(len(c) for _, c in SEQS)
    assert sum(s[0] for s in shapes) == 2 * n_completion  # every completion position once, under each model
    assert max(s[0] for s in shapes) == L.chunk_rows(32000, budget) == 2
    assert all(s[1] == 32000 and 4 * s[0] * s[1] <= budget for s in shapes)
    assert all(c[1] <= 4 for c in head_calls)  # only the head check's four tokens
    want = _unchunked(big, [big], SEQS)
    assert torch.allclose(got[0].double(), want[0].double(), atol=2e-5, rtol=1e-5)
    assert torch.allclose(got[2], torch.zeros_like(got[2]), atol=1e-6)  # KL of a policy to itself


def test_bf16_policy_log_probs(tiny_lm):
    """`--dtype bf16`: the log-prob numerics after the network are float32-exact (against float64 from the bf16
    model's own final hidden states and LM head weights), and the bf16 policy's log-probs are within a stated
    tolerance of the fp32 policy's — the difference is π itself moving with bf16 weights, not arithmetic."""
    from train.logps import decoder, logps_and_kl
    from train.models import load_policy

    model, tok, path = tiny_lm
    bf16, _ = load_policy(str(path), dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    got = logps_and_kl(bf16, [], tok, None, None, batch_size=2, ids=SEQS)[0]
    want = []
    w = bf16.get_output_embeddings().weight.detach().double()
    for p, c in SEQS:
        with torch.no_grad():
            h = decoder(bf16)(input_ids=torch.tensor([p + c])).last_hidden_state[0].double()
        lp = torch.log_softmax(h @ w.T, -1)[len(p) - 1 : -1]
        want.append(float(lp.gather(1, torch.tensor(c)[:, None]).sum()))
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    fp32 = logps_and_kl(model, [], tok, None, None, batch_size=2, ids=SEQS)[0]
    per_token = (got - fp32).abs() / torch.tensor([len(c) for _, c in SEQS])
    assert per_token.max() < 2e-3, per_token  # stated tolerance: 2e-3 nats per token (measured: ≤ 3e-4)
    assert not torch.equal(got, fp32)
