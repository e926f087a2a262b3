import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bridge.certificate import Certificate
from bridge.labels import pseudo_preferences
from bridge.preferences import PreferenceSet
from can_jax.errors import CanError
from train.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A scores table with text, and its certificate from `can dual` (the real chain, not a hand-made dict)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        k = 1 if i % 50 == 0 else 6  # a few single-response prompts
        for j in range(k):
            h = rng.normal()
            rows.append({"pid": i, "prompt": f"q{i}", "response": f"a{i}-{j}", "r": 3 * h + rng.normal(),
                         "safe": -0.5 * h + rng.normal(), "harm": 0.5 * h + rng.normal()})  # fmt: skip
    d = tmp_path_factory.mktemp("lab")
    path = d / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cert_path = d / "cert.json"
    res = runner.invoke(app, ["dual", str(path), "--reward", "r", "--prompt-id", "pid", "--constraint", "safe=0.2",
                              "--cost", "harm=0.2", "--beta", "1", "--out", str(cert_path)])  # fmt: skip
    assert res.exit_code == 0, res.output
    return path, Certificate.read(cert_path), d


def test_bt_labels_follow_bradley_terry(labelled):
    path, cert, _ = labelled
    prefs, stats = pseudo_preferences(path, cert, "bt", pairs_per_prompt=20, seed=1)
    table = prefs.table
    # K = 6 has 15 distinct pairs: all of them, each once (issue #13: never a repeated pair), and counted as capped.
    assert stats.prompts_skipped == 8 and stats.prompts_used == 392 and stats.pairs == 392 * 15
    assert stats.pairs_capped == 392
    # Independent check of the score: recompute r + λ_safe·safe − λ_harm·harm from the raw rows.
    raw = pq.read_table(path).to_pandas().set_index("response")
    lam = cert.lam
    s = raw["r"] + lam["safe"] * raw["safe"] - lam["harm"] * raw["harm"]
    t = table.to_pandas()
    np.testing.assert_allclose(t["score_chosen"], s.loc[t["chosen"]].to_numpy(), rtol=1e-12)
    # The chosen side wins with probability σ(s_c − s_r) when the pair is oriented by score: compare the fraction
    # of pairs where the higher-scored response was chosen with the mean Bradley–Terry probability.
    hi = np.maximum(t["score_chosen"], t["score_rejected"])
    lo = np.minimum(t["score_chosen"], t["score_rejected"])
    expected = np.mean(1 / (1 + np.exp(-(hi - lo))))
    observed = np.mean(t["score_chosen"] > t["score_rejected"])
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(t))


def test_soft_and_hard_modes_and_determinism(labelled):
    path, cert, _ = labelled
    soft, _ = pseudo_preferences(path, cert, "soft", 3, seed=2)
    t = soft.table.to_pandas()
    assert np.all(t["p_chosen"] >= 0.5)
    np.testing.assert_allclose(t["p_chosen"], 1 / (1 + np.exp(-(t["score_chosen"] - t["score_rejected"]))))
    hard, _ = pseudo_preferences(path, cert, "hard", 3, seed=2)
    h = hard.table.to_pandas()
    assert np.all(h["score_chosen"] > h["score_rejected"])
    again, _ = pseudo_preferences(path, cert, "bt", 3, seed=7)
    once_more, _ = pseudo_preferences(path, cert, "bt", 3, seed=7)
    assert again.table.equals(once_more.table)


def test_refuses_other_table_and_cli_writes_metadata(labelled, tmp_path):
    path, cert, d = labelled
    other = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(path).slice(0, 100), other)
    with pytest.raises(CanError, match="another scores table"):
        pseudo_preferences(other, cert)
    out = tmp_path / "prefs.parquet"
    res = runner.invoke(app, ["label", str(path), str(d / "cert.json"), "--out", str(out), "--mode", "soft"])
    assert res.exit_code == 0, res.output
    meta, written = PreferenceSet.read_metadata(out)
    assert written.beta == 1.0 and written.lam == cert.lam and meta["mode"] == "soft"
    assert meta["certificate_sha256"] == written.sha256 == cert.sha256
    assert set(pq.read_schema(out).names) >= {"prompt", "chosen", "rejected", "score_chosen", "score_rejected",
                                              "p_chosen"}  # fmt: skip
    bad = runner.invoke(app, ["label", str(other), str(d / "cert.json"), "--out", str(tmp_path / "x.parquet")])
    assert bad.exit_code == 1 and "another scores table" in bad.stderr
