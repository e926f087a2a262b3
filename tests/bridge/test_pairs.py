"""Relabelling an existing pairs dataset with λ* (issue 10), against a hand computation on a PKU-style file."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from can_jax.errors import CanError


@pytest.fixture(scope="module")
def cert_path(tmp_path_factory):
    """A real certificate from `can dual` on samples of a reference policy: reward `reward`, cost `cost`."""
    from train.cli import app

    tmp = tmp_path_factory.mktemp("cert")
    rng = np.random.default_rng(0)
    n, k = 60, 6
    h = rng.normal(size=n * k)
    table = pa.table({"prompt_id": np.repeat(np.arange(n), k), "reward": 2 * h + rng.normal(size=n * k),
                      "cost": h + 0.5 * rng.normal(size=n * k)})  # fmt: skip
    pq.write_table(table, tmp / "scores.parquet")
    res = CliRunner().invoke(app, ["dual", str(tmp / "scores.parquet"), "--reward", "reward", "--cost", "cost=0.3",
                                   "--beta", "1.0", "--out", str(tmp / "cert.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    cert = json.loads((tmp / "cert.json").read_text())
    assert cert["lambda"]["cost"] > 0.1
    return tmp / "cert.json"


def _pku(tmp_path, n=8, seed=1, fmt="jsonl"):
    rng = np.random.default_rng(seed)
    rows = [{"prompt": f"question {i}?", "response_0": f"answer a{i}", "response_1": f"answer b{i}",
             "reward_0": float(rng.normal()), "reward_1": float(rng.normal()),
             "cost_0": float(rng.normal()), "cost_1": float(rng.normal()),
             "is_response_0_safe": bool(rng.random() < 0.5)} for i in range(n)]  # fmt: skip
    path = tmp_path / f"pku.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path, rows


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_pku_pairs_relabelled_by_hand(cert_path, tmp_path, mode):
    from train.cli import app

    path, rows = _pku(tmp_path)
    cert = json.loads(cert_path.read_text())
    lam = cert["lambda"]["cost"]
    out = tmp_path / "prefs.parquet"
    res = CliRunner().invoke(app, ["label", str(path), str(cert_path), "--mode", mode, "-o", str(out)])
    assert res.exit_code == 0, res.output
    got = pq.read_table(out).to_pylist()
    assert len(got) == len(rows)
    for row, g in zip(rows, got, strict=True):
        s0 = row["reward_0"] - lam * row["cost_0"]  # a cost enters as −c (DESIGN §1), weighted by λ*
        s1 = row["reward_1"] - lam * row["cost_1"]
        first = s0 >= s1 if mode == "hard" else 1 / (1 + np.exp(s1 - s0)) >= 0.5
        assert g["chosen"] == (row["response_0"] if first else row["response_1"])
        assert g["rejected"] == (row["response_1"] if first else row["response_0"])
        assert g["p_chosen"] == pytest.approx(1 / (1 + np.exp(-abs(s0 - s1))), rel=1e-9)
        assert g["score_chosen"] == pytest.approx(max(s0, s1), rel=1e-12)
    from bridge.preferences import PreferenceSet

    meta, written = PreferenceSet.read_metadata(out)
    assert written.beta == cert["beta"] and meta["mode"] == mode and meta["layout"] == "pku"
    # `can train` reads it as a can-labelled dataset (β and mode from the metadata).
    from train.dpo import load_preferences

    data, prefs = load_preferences(out)
    assert prefs.beta == cert["beta"] and len(data) == len(rows)


def test_trl_conversational_pairs_and_datasets_directory(cert_path, tmp_path):
    from datasets import Dataset

    from train.cli import app

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}],
             "chosen": [{"role": "assistant", "content": f"c{i}"}],
             "rejected": [{"role": "assistant", "content": f"r{i}"}],
             "reward_chosen": float(i % 3), "reward_rejected": 1.0, "cost_chosen": 0.0,
             "cost_rejected": float(i % 2)} for i in range(6)]  # fmt: skip
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "prefs.parquet"
    res = CliRunner().invoke(app, ["label", str(tmp_path / "ds"), str(cert_path), "--mode", "hard", "-o", str(out)])
    assert res.exit_code == 0, res.output
    got = pq.read_table(out).to_pylist()
    lam = json.loads(cert_path.read_text())["lambda"]["cost"]
    kept = [r for r in rows if r["reward_chosen"] != 1.0 - lam * r["cost_rejected"]]
    assert len(got) == len(kept)
    for r, g in zip(kept, got, strict=True):
        s_c, s_r = r["reward_chosen"], 1.0 - lam * r["cost_rejected"]
        assert g["prompt"] == r["prompt"]
        assert g["chosen"] == (r["chosen"] if s_c > s_r else r["rejected"])  # stays conversational
        assert g["swapped"] == (s_c < s_r)


def test_scores_computed_by_scorers_and_bad_inputs(cert_path, tmp_path):
    from train.cli import app

    rows = [{"prompt": "q", "response_0": "short", "response_1": "a much longer answer", "cost_0": 0.0,
             "cost_1": 0.0}]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    out = tmp_path / "o.parquet"
    # No reward columns and no recorded scorer for it: one line naming the fix.
    res = runner.invoke(app, ["label", str(path), str(cert_path), "-o", str(out)])
    assert res.exit_code == 1 and "reward" in res.output and "-s reward=SPEC" in res.output
    assert not out.exists()
    res = runner.invoke(app, ["label", str(path), str(cert_path), "--mode", "hard", "-o", str(out),
                              "-s", "reward=tests.train.toy_scorers:length"])  # fmt: skip
    assert res.exit_code == 0, res.output
    got = pq.read_table(out).to_pylist()
    assert got[0]["chosen"] == "a much longer answer" and got[0]["score_chosen"] == 20.0
    # A scorer name the certificate does not have; a pairs file missing a column: one line each.
    res = runner.invoke(app, ["label", str(path), str(cert_path), "-s", "nope=tests.train.toy_scorers:length"])
    assert res.exit_code == 1 and "not in the certificate" in res.output
    from bridge.pairs import read_pairs

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response_0": "a"}) + "\n")
    with pytest.raises(CanError, match="response_1"):
        read_pairs(bad)
