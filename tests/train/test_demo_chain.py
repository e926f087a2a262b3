"""The whole MoCAN chain (collect → dual → label → DPO → evaluate) on a tiny local LM with toy scorers."""

import json

import pytest

pytest.importorskip("trl")


def test_chain_moves_the_constraint_in_the_predicted_direction(tiny_lm, tmp_path):
    from train.demo import DemoConfig, run_chain

    _, _, path = tiny_lm
    prompts = [f"tell me about item {i}." for i in range(24)]
    cfg = DemoConfig(policy=str(path), reward="brev",
                     scorers=["brev=tests.train.toy_scorers:brevity", "e=tests.train.toy_scorers:e_share"],
                     train_prompts=prompts, eval_prompts=[f"what is thing {i}?" for i in range(24)], k=8,
                     max_new_tokens=12, beta=0.1, margin_frac=0.5, pairs_per_prompt=8, epochs=3, lr=3e-3,
                     batch_size=16, max_length=64)  # fmt: skip
    report = run_chain(cfg, tmp_path, say=lambda *_: None)
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["converged"] and cert["lambda"]["e"] > 0
    row = next(r for r in report["rows"] if r["name"] == "e")
    assert row["predicted_gain"] > 0
    assert row["ci95"][0] > 0  # achieved: the 'e' share rose, significantly
    assert (tmp_path / "evaluation" / "evaluation.md").exists() and (
        tmp_path / "evaluation" / "evaluation.png"
    ).exists()
