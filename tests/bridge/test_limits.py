"""Absolute limits and the certificate's format version 2 (issue 10)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bridge.scores_table import write_scores_table
from train.cli import app


@pytest.fixture(scope="module")
def table_path(tmp_path_factory):
    rng = np.random.default_rng(3)
    n, k = 50, 5
    h = rng.normal(size=n * k)
    t = pa.table({"prompt_id": np.repeat(np.arange(n), k), "r": 2 * h + rng.normal(size=n * k),
                  "c": 1.0 + h + 0.4 * rng.normal(size=n * k), "u": -h + rng.normal(size=n * k)})  # fmt: skip
    meta = {"scorers": {"c": {"spec": "org/cost-model", "template": "safe-rlhf"}, "r": {"spec": "builtin:x"}}}
    path = tmp_path_factory.mktemp("lim") / "scores.parquet"
    write_scores_table(path, t, meta)
    return path


def _dual(path, tmp_path, *args, name="cert.json"):
    out = tmp_path / name
    res = CliRunner().invoke(app, ["dual", str(path), "--reward", "r", "--beta", "0.5", "--out", str(out), *args])
    return res, out


def test_cost_at_most_is_the_margin_e_ref_minus_d(table_path, tmp_path):
    t = pq.read_table(table_path).to_pandas()
    e_ref_c = t.groupby("prompt_id")["c"].mean().mean()  # by hand: the mean of per-prompt sample means
    e_ref_u = t.groupby("prompt_id")["u"].mean().mean()
    d, tau = float(e_ref_c - 0.3), float(e_ref_u + 0.2)
    res, out = _dual(table_path, tmp_path, "--cost-at-most", f"c={d!r}", "--at-least", f"u={tau!r}")
    assert res.exit_code == 0, res.output
    cert = json.loads(out.read_text())
    assert cert["format_version"] == 2
    lim = cert["limits"]
    assert lim["c"]["kind"] == "at most" and lim["c"]["value"] == d
    assert lim["c"]["reference_mean"] == pytest.approx(e_ref_c, rel=1e-12)
    assert lim["c"]["implied_margin"] == pytest.approx(0.3, abs=1e-12) == pytest.approx(cert["margins"]["c"])
    assert lim["u"]["implied_margin"] == pytest.approx(0.2, abs=1e-12)
    # The same problem stated as relative margins gives the same λ*.
    res, rel = _dual(table_path, tmp_path, "--cost", "c=0.3", "--constraint", "u=0.2", name="rel.json")
    assert res.exit_code == 0, res.output
    lam_rel = json.loads(rel.read_text())["lambda"]
    for name in ("c", "u"):
        assert cert["lambda"][name] == pytest.approx(lam_rel[name], rel=1e-9, abs=1e-12)
    assert cert["lambda"]["c"] > 0 and cert["lambda"]["u"] > 0
    # Scorers recorded from the table's collect metadata, with signs.
    sc = cert["scorers"]
    assert sc["c"] == {"role": "constraint", "sign": -1, "spec": "org/cost-model", "template": "safe-rlhf"}
    assert sc["r"]["role"] == "reward" and sc["u"]["spec"] is None and sc["u"]["sign"] == 1
    assert cert["round"] == {"index": 0, "parent_sha256": None}
    assert {"lambda", "predicted", "warnings"} <= set(cert["bias"])  # can dual --bias is on by default (issue 14)


def test_limit_errors_are_one_line(table_path, tmp_path):
    for args, msg in [(["--cost-at-most", "nope=0"], "nope"), (["--cost-at-most", "c=x"], "not a number"),
                      (["--cost-at-most", "c=0", "--at-least", "c=1"], "two limits"),
                      (["--at-least", "u=inf"], "finite")]:  # fmt: skip
        res, out = _dual(table_path, tmp_path, *args)
        assert res.exit_code != 0 and msg in res.output and "Traceback" not in res.output, res.output
        assert not out.exists()


def test_version_1_certificates_are_read_as_version_2(table_path, tmp_path):
    from bridge.certificate import Certificate

    res, out = _dual(table_path, tmp_path, "--cost", "c=0.2")
    assert res.exit_code == 0, res.output
    old = json.loads(out.read_text())
    old["format_version"] = 1
    for key in ("scorers", "limits", "round", "bias"):
        old.pop(key)
    out.write_text(json.dumps(old))
    cert = Certificate.read(out)
    assert cert.scorers == {} and cert.limits == {} and cert.round["index"] == 0
    old["format_version"] = 3
    out.write_text(json.dumps(old))
    from can_jax.errors import CanError

    with pytest.raises(CanError, match="versions 1, 2"):
        Certificate.read(out)


def test_limits_are_echoed_as_typed_with_the_implied_margin(table_path, tmp_path):
    """Issue 24: `--cost-at-most c=0.8` is shown as E[c] ≤ 0.8, the margin it implies beside it."""
    t = pq.read_table(table_path).to_pandas()
    e_ref_c = t.groupby("prompt_id")["c"].mean().mean()
    res, out = _dual(table_path, tmp_path, "--cost-at-most", "c=0.8", "--at-least", "u=0")
    assert res.exit_code == 0, res.output
    assert f"E[c] ≤ 0.8 (b {e_ref_c - 0.8:.6g})" in res.stdout
    assert "E[u] ≥ 0 (b" in res.stdout
    assert f"limit E[c] ≤ 0.8: the reference policy's E_ref[c] = {e_ref_c:.6g}" in " ".join(res.stdout.split())


@pytest.mark.parametrize("json_out", [False, True])
def test_infeasible_limits_speak_in_limits(table_path, tmp_path, json_out):
    """An out-of-reach limit is named as typed, with the best expected value these samples allow (the least mean
    of per-prompt minimum costs; the most of per-prompt maximum utilities)."""
    t = pq.read_table(table_path).to_pandas()
    least_c = t.groupby("prompt_id")["c"].min().mean()
    most_u = t.groupby("prompt_id")["u"].max().mean()
    for args, limit, best in [(["--cost-at-most", "c=-5"], "E[c] ≤ -5", least_c),
                              (["--at-least", "u=7.5", "--cost", "c=0.1"], "E[u] ≥ 7.5", most_u)]:  # fmt: skip
        res, out = _dual(table_path, tmp_path, *args, *(["--json"] if json_out else []))
        assert res.exit_code == 1 and not out.exists(), res.output
        line = res.stderr.strip()
        assert line.startswith("error: infeasible limits: ") and "\n" not in line, line
        assert f"{limit} is out of reach" in line and f"attains is {best:.6g}" in line, line
        assert "margin" not in line
        if json_out:
            assert json.loads(res.stdout)["status"] == "infeasible"


def test_round_certificate_solves_the_dual_at_its_lambda_and_links_its_parent(table_path, tmp_path):
    """`bridge.dual.round_certificate`: the certificate's λ is the requested one (to the solver's tolerance), its
    predicted gains are π_λ's on the samples (tests/reference.py, from explicit weights), a constraint whose
    requested λ is 0 keeps a margin it meets, and the round block links the parent and the chain's margins."""
    from bridge.certificate import Certificate
    from bridge.dual import check_solution, round_certificate
    from bridge.tables import load_for
    from tests.reference import ref_predicted

    res, path = _dual(table_path, tmp_path, "--constraint", "u=0.1", "--cost", "c=0.05")
    assert res.exit_code == 0, res.output
    parent = Certificate.read(path)
    lam = np.array([parent.lam["u"] * 2 + 0.3, 0.0])
    cert = round_certificate(load_for(table_path, parent), parent, lam, 1, step="newton",
                             measured_gains={"u": 0.01, "c": 0.2})  # fmt: skip
    got = np.array([cert.lam["u"], cert.lam["c"]])
    np.testing.assert_allclose(got, lam, atol=1e-7)
    table = pq.read_table(table_path).to_pandas()
    groups = [(d["r"].to_numpy(), np.stack([d["u"].to_numpy(), -d["c"].to_numpy()], 1))
              for _, d in table.groupby("prompt_id")]  # fmt: skip
    _, gains, _ = ref_predicted(lam, groups, parent.beta)
    np.testing.assert_allclose([cert.predicted_gains["u"], cert.predicted_gains["c"]], gains, atol=1e-7)
    assert cert.margins["u"] == pytest.approx(gains[0], abs=1e-9)
    assert cert.margins["c"] <= parent.margins["c"] + 1e-12 and cert.margins["c"] <= gains[1] + 1e-12
    assert cert.round["index"] == 1 and cert.round["parent_sha256"] == parent.sha256
    assert cert.round["root_sha256"] == parent.sha256 and cert.target_margins == parent.margins
    assert cert.round["step"] == "newton" and cert.round["measured_gains"]["c"] == 0.2
    check_solution(table_path, cert)  # what `label` re-checks
    # Round 2 from round 1: the chain's margins and root are carried, the parent is round 1.
    cert2 = round_certificate(load_for(table_path, cert), cert, lam * 1.1, 2)
    assert cert2.round["parent_sha256"] == cert.sha256 and cert2.round["root_sha256"] == parent.sha256
    assert cert2.target_margins == parent.margins
