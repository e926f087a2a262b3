"""The DPO loss TRL optimises through CanDPOTrainer equals a hand computation from sequence log-probs."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

DATA = {
    "prompt": ["how do i bake bread?", "is it safe to mix bleach and ammonia?", "tell me a joke."],
    "chosen": [" mix flour and water.", " no, never.", " why did the chicken cross the road?"],
    "rejected": [" bake it.", " yes.", " paris is the capital of france."],
    "p_chosen": [0.9, 0.6, 0.75],
}
BETA = 0.7


@pytest.fixture(scope="module")
def ref_lm(other_lm):
    return other_lm[0]  # a different reference, so that Δ ≠ 0


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """A real certificate at β = 0.5 with one constraint `a` (`can dual` on a small synthetic table)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bridge.dual import DualConfig, run

    rng = np.random.default_rng(0)
    n, k = 40, 4
    h = rng.normal(size=n * k)
    scores = tmp_path_factory.mktemp("dpo-cert") / "scores.parquet"
    pq.write_table(pa.table({"prompt_id": np.repeat(np.arange(n), k), "r": 2 * h + rng.normal(size=n * k),
                             "a": -h + rng.normal(size=n * k)}), scores)  # fmt: skip
    cert = run(DualConfig(str(scores), "r", 0.5, constraint=["a=0.1"]))
    assert cert.converged and cert.beta == 0.5 and cert.names == ["a"]
    return cert


def _write_prefs(path, data, mode, cert):
    """A can-labelled preference set of hand-made pairs under a real certificate."""
    import pyarrow as pa

    from bridge.preferences import PreferenceSet

    PreferenceSet(pa.table(data), {"mode": mode, "pairs_per_prompt": 1, "seed": 0}, cert).write(path)


def _hand_loss(policy, ref, tok, soft):
    from train.logps import sequence_logps

    lp = lambda m, col: sequence_logps(m, tok, DATA["prompt"], DATA[col], max_length=48)  # noqa: E731
    delta = (lp(policy, "chosen") - lp(ref, "chosen")) - (lp(policy, "rejected") - lp(ref, "rejected"))
    total = 0.0
    for d, p in zip(delta.tolist(), DATA["p_chosen"], strict=True):
        p = p if soft else 1.0
        sig = 1 / (1 + math.exp(-BETA * d))
        total += -(p * math.log(sig) + (1 - p) * math.log(1 - sig))
    return total / len(delta)


@pytest.mark.parametrize("soft", [True, False])
def test_trainer_loss_equals_hand_computation(tiny_lm, ref_lm, tmp_path, soft):
    from datasets import Dataset

    from train.dpo import CanDPOTrainer, SoftPreferenceCollator, make_config

    model, tok, _ = tiny_lm
    data = DATA if soft else {k: v for k, v in DATA.items() if k != "p_chosen"}
    args = make_config(tmp_path, BETA, "fp32", per_device_train_batch_size=3, max_length=48)
    trainer = CanDPOTrainer(model=model, ref_model=ref_lm, args=args, train_dataset=Dataset.from_dict(data),
                            processing_class=tok, data_collator=SoftPreferenceCollator(pad_token_id=tok.pad_token_id,
                                                                                       max_length=48))  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("p_chosen" in batch) == soft
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(_hand_loss(model, ref_lm, tok, soft), abs=1e-4)


def test_can_train_cli_runs_checkpoints_and_refuses_beta_mismatch(tiny_lm, cert, tmp_path):
    from typer.testing import CliRunner

    from train.cli import app

    _, _, path = tiny_lm
    prefs = tmp_path / "prefs.parquet"
    _write_prefs(prefs, {k: v * 2 for k, v in DATA.items()}, "soft", cert)
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(prefs), "--policy", str(path), "--out", str(tmp_path / "run"),
                              "--batch-size", "2", "--max-length", "48", "--epochs", "2", "--lr", "1e-3"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    assert any((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    bad = runner.invoke(app, ["train", str(prefs), "--policy", str(path), "--out", str(tmp_path / "r2"), "--beta", "1"])
    assert bad.exit_code == 1 and "differs from the certificate" in bad.stderr
    notlm = runner.invoke(app, ["train", str(prefs), "--policy", str(tmp_path), "--out", str(tmp_path / "r3")])
    assert notlm.exit_code == 1 and "not a model directory" in notlm.stderr


def test_lora_training_saves_a_standalone_merged_policy(tiny_lm, cert, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.dpo import DPOSettings, TrainConfig, run

    model, _, path = tiny_lm
    _write_prefs(tmp_path / "prefs.parquet", {k: v * 2 for k, v in DATA.items() if k != "p_chosen"}, "bt", cert)
    final = run(TrainConfig(preferences=str(tmp_path / "prefs.parquet"), policy=str(path), out=str(tmp_path / "run"),
                            dpo=DPOSettings(epochs=1, lr=1e-2, batch_size=2, max_length=48, lora=True)))  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(final)  # no adapter files needed
    changed = any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), model.state_dict().values()))
    assert changed and (final / "config.json").exists()


def test_resume_continues_from_the_last_checkpoint_and_top_layer_training(tiny_lm, cert, tmp_path):
    """An interrupted run (here: stopped after 2 epochs) resumed with more epochs continues from its checkpoint
    instead of starting over; and --train-top leaves the lower blocks and the embeddings untouched."""
    import json
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from train.dpo import DPOSettings, TrainConfig, run

    model, _, path = tiny_lm
    _write_prefs(tmp_path / "p.parquet", {k: v * 2 for k, v in DATA.items()}, "soft", cert)
    kw = dict(preferences=str(tmp_path / "p.parquet"), policy=str(path), out=str(tmp_path / "run"),
              extra_args=["--save_steps", "3"])
    dpo = DPOSettings(lr=1e-3, batch_size=2, max_length=48, train_top=1)
    run(TrainConfig(dpo=replace(dpo, epochs=2), **kw))  # 6 pairs / 2 = 3 steps per epoch
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts[-1].name == "checkpoint-6"
    # Mark the checkpoint's history: a resumed run carries it forward, a run started over would not.
    stamp = ckpts[-1] / "trainer_state.json"
    state = json.loads(stamp.read_text())
    state["log_history"].append({"step": 6, "marker": 1})
    stamp.write_text(json.dumps(state))
    final = run(TrainConfig(dpo=replace(dpo, epochs=3), resume=True, **kw))
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    assert {"step": 6, "marker": 1} in state["log_history"]
    tuned = AutoModelForCausalLM.from_pretrained(final).state_dict()
    base = model.state_dict()
    frozen = [k for k in base if "layers.0." in k or "embed_tokens" in k]
    moved = [k for k in base if "layers.1." in k]
    assert frozen and all(torch.equal(tuned[k], base[k]) for k in frozen)
    assert any(not torch.equal(tuned[k], base[k]) for k in moved)
