"""Outputs the ecosystem keeps (issue 10): the preference dataset as a `datasets` directory with its metadata and
certificate, loadable by a plain TRL script; the aligned policy's model card and certificate copy."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


def test_datasets_directory_plain_trl_and_model_card(tiny_lm, tmp_path):
    import numpy as np
    from datasets import load_from_disk
    from trl import DPOConfig, DPOTrainer
    from typer.testing import CliRunner

    from bridge.preferences import PreferenceSet
    from train.cli import app

    _, tok, path = tiny_lm
    rng = np.random.default_rng(0)
    n, k = 6, 4
    words = ["yes.", "no, never.", "paris is the capital.", "bake it.", "mix flour and water.", "why?"]
    table = pa.table({"prompt_id": np.repeat(np.arange(n), k), "prompt": [f"question {i}?" for i in range(n)
                      for _ in range(k)], "response": [words[j % 6] for j in range(n * k)],
                      "r": rng.normal(size=n * k), "c": rng.normal(size=n * k)})  # fmt: skip
    pq.write_table(table, tmp_path / "scores.parquet")
    runner = CliRunner()
    cert_path = tmp_path / "cert.json"
    res = runner.invoke(app, ["dual", str(tmp_path / "scores.parquet"), "--reward", "r", "--cost", "c=0.1", "--beta",
                              "0.5", "--out", str(cert_path)])  # fmt: skip
    assert res.exit_code == 0, res.output
    cert = json.loads(cert_path.read_text())
    res = runner.invoke(app, ["label", str(tmp_path / "scores.parquet"), str(cert_path), "--mode", "soft",
                              "--pairs-per-prompt", "2", "-o", str(tmp_path / "prefs")])  # fmt: skip
    assert res.exit_code == 0, res.output
    ds = load_from_disk(str(tmp_path / "prefs"))
    meta = json.loads(ds.info.description)["can"]
    record, written = PreferenceSet.read_metadata(tmp_path / "prefs")
    assert record == meta
    assert written.beta == 0.5 and meta["mode"] == "soft" and written.lam == cert["lambda"]
    assert json.loads((tmp_path / "prefs" / "certificate.json").read_text()) == cert
    assert len(meta["certificate_sha256"]) == 64 and meta["certificate_sha256"] == written.sha256
    # A plain TRL script takes the directory as it is.
    cfg = DPOConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                    max_length=64, report_to=[], beta=written.beta, max_steps=1, save_strategy="no")  # fmt: skip
    trainer = DPOTrainer(model=str(path), args=cfg, train_dataset=ds, processing_class=tok)
    assert trainer.train().global_step == 1
    # `can train` on the directory: β from its metadata; the policy folder has a model card and the certificate.
    res = runner.invoke(app, ["train", str(tmp_path / "prefs"), "--policy", str(path), "--out", str(tmp_path / "run"),
                              "--batch-size", "4", "--precision", "fp32", "--max_steps", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    policy = tmp_path / "run" / "policy"
    assert json.loads((policy / "certificate.json").read_text()) == cert
    card = (policy / "README.md").read_text()
    assert f"{cert['lambda']['c']:.4g}" in card and "β (KL weight of the dual and of DPO): 0.5" in card
    assert "base_model:" in card and "| c | cost |" in card
