"""The whole MoCAN chain (collect → dual → label → DPO → evaluate) on a tiny local LM with toy scorers, and the
PeCAN chain beside it (pre-align per aspect → log-ratios → dual → label → DPO → evaluate → comparison)."""

import json

import pytest

pytest.importorskip("trl")


def test_chain_moves_the_constraint_in_the_predicted_direction(mocan_run):
    _, out, report = mocan_run
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["converged"] and cert["lambda"]["e"] > 0
    row = report.row("e")
    assert row.predicted_gain > 0
    # DPO learned the tilt on the samples the dual saw, and the 'e' share rose on 96 held-out prompts, significantly.
    # Measured (seeds 0, 1, 2): predicted +0.052/+0.054/+0.049, on the training samples +0.048/+0.043/+0.047, held
    # out +0.0028 [+0.0003, +0.0053] / +0.0058 [+0.0030, +0.0087] / +0.0026 [+0.0004, +0.0048]; with 24 held-out
    # prompts the intervals of seeds 0 and 2 included 0.
    assert row.insample_gain >= 0.5 * row.predicted_gain
    assert row.ci95[0] > 0
    assert (out / "evaluation" / "evaluation.md").exists() and (out / "evaluation" / "evaluation.png").exists()


def test_demo_writes_what_the_cli_writes(mocan_run, tmp_path):
    """Issue 19: the demo runs the stages the CLI runs, so its certificate has the CLI's blocks (bias, scorers,
    devices) and values, and its pairs carry the collection tokenizer's fingerprint that `can train` checks."""
    from typer.testing import CliRunner

    from bridge.preferences import PreferenceSet
    from train.cli import app

    cfg, out, _ = mocan_run
    demo = json.loads((out / "certificate.json").read_text())
    assert demo["bias"] and set(demo["scorers"]) == {"brev", "e"} and demo["devices"]["count"] >= 1
    margins = [f"{n}={m}" for n, m in demo["margins"].items()]
    res = CliRunner().invoke(app, ["dual", str(out / "scores.parquet"), "--reward", cfg.reward, "--beta",
                                   str(cfg.beta), *sum((["--constraint", c] for c in margins), []), "--out",
                                   str(tmp_path / "cli.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "cli.json").read_text())
    volatile = {"created", "timing"}
    assert {k for k in cli if k not in volatile} == {k for k in demo if k not in volatile}
    assert {k: v for k, v in cli.items() if k not in volatile} == {k: v for k, v in demo.items() if k not in volatile}
    record, cert = PreferenceSet.read_metadata(out / "preferences.parquet")
    assert record["tokenizer_sha256"] and cert.sha256 == record["certificate_sha256"]
    assert (out / "run" / "policy" / "certificate.json").exists()


def test_pecan_chain_beside_mocan(mocan_run, tmp_path):
    from train.demo_pecan import run_pecan

    cfg, mocan_dir, _ = mocan_run
    # kl="sample": this tiny byte-level model's decoded samples do not re-tokenize to the sampled tokens, so the
    # token-level KL is not along the samples the log-ratios are taken on (test_pecan_lm checks it where it is).
    comparison = run_pecan(cfg, tmp_path, mocan_dir, say=lambda *_: None, prealign_pairs=8, prealign_epochs=2,
                           kl="sample")  # fmt: skip
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["converged"] and set(cert["lambda"]) == {"pre_e"}
    assert cert["data"]["reference_expectation"] == {"pre_e": "sample mean"}
    pre = json.loads((tmp_path / "pre_e" / "policy" / "prealign.json").read_text())
    assert pre["beta"] == cfg.beta
    row = next(r for r in comparison["rows"] if r["name"] == "e")
    # The pre-aligned 'e' model learned from pairs labelled by the e share alone, so PeCAN's π_λ* on the samples
    # raises the e share. (Whether the tiny model trained on its labels does is not asserted: measured −0.002
    # [−0.004, −0.000] here, against MoCAN's +0.006 [+0.001, +0.010].)
    assert row["pecan_implied"] > 0
    assert row["pecan_achieved"] is not None
    for name in ("comparison.md", "comparison.png", "comparison.json"):
        assert (tmp_path / name).exists()
