"""The `can` CLI contract of issue #2: flags, JSON keys, exit codes, one-line errors without tracebacks."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import make_groups
from tests.reference import ref_solve_lbfgsb
from train.cli import app

runner = CliRunner()
GROUPS = make_groups(4, 120, 8, 2)


@pytest.fixture(scope="module")
def scores_path(tmp_path_factory):
    rows = []
    for i, (r, g) in enumerate(GROUPS):
        for k in range(len(r)):
            rows.append({"pid": i, "helpful": r[k], "safe": g[k, 0], "toxic": -g[k, 1]})
    path = tmp_path_factory.mktemp("data") / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _args(path, *extra, safe="safe=0.2", beta="0.5"):
    return ["dual", str(path), "--reward", "helpful", "--prompt-id", "pid", "--constraint", safe,
            "--cost", "toxic=0.1", "--beta", beta, *extra]  # fmt: skip


def test_dual_json_contract_and_answer(scores_path, tmp_path):
    out = tmp_path / "cert.json"
    res = runner.invoke(app, _args(scores_path, "--json", "--out", str(out)))
    assert res.exit_code == 0, res.output
    cert = json.loads(res.stdout)
    for key in ["lambda", "beta", "margins", "status", "converged", "iterations", "kkt_residual",
                "min_hessian_eig", "predicted"]:  # fmt: skip
        assert key in cert
    assert cert["converged"] and cert["status"] == "converged" and cert["beta"] == 0.5
    assert cert["margins"] == {"safe": 0.2, "toxic": 0.1}
    ref = ref_solve_lbfgsb(GROUPS, np.array([0.2, 0.1]), 0.5)  # toxic is −g₂: negated back on the way in
    np.testing.assert_allclose([cert["lambda"]["safe"], cert["lambda"]["toxic"]], ref, atol=1e-6)
    assert json.loads(out.read_text())["lambda"] == cert["lambda"]
    c = {x["name"]: x for x in cert["constraints"]}
    assert c["toxic"]["kind"] == "cost"
    assert c["toxic"]["predicted_cost_change"] == pytest.approx(-c["toxic"]["predicted_gain"])
    assert cert["data"]["n_prompts"] == 120 and len(cert["data"]["sha256"]) == 64


def test_dual_table_output_and_float32(scores_path):
    res = runner.invoke(app, _args(scores_path, "--float32"))
    assert res.exit_code == 0, res.output
    assert "λ*" in res.stdout and "safe" in res.stdout and "converged" in res.stdout


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"safe": "safe=50"}, "infeasible"),
        ({"safe": "nope=0.1"}, "missing column"),
        ({"beta": "0"}, "--beta must be a positive"),
        ({"beta": "-1"}, "--beta must be a positive"),
        ({"safe": "safe"}, "COLUMN=MARGIN"),
        ({"safe": "toxic=0.1"}, "named twice"),
    ],
)
def test_user_errors_are_one_line(scores_path, change, expect):
    res = runner.invoke(app, _args(scores_path, **change))
    assert res.exit_code != 0
    assert expect in res.stderr
    assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1


def test_missing_file_nan_rows_and_one_response(tmp_path):
    res = runner.invoke(app, _args(tmp_path / "nope.parquet"))
    assert res.exit_code == 1 and "not found" in res.stderr
    rows = [{"pid": i // 2, "helpful": 1.0 * i, "safe": 0.5, "toxic": 0.1} for i in range(10)]
    rows[3]["safe"] = float("nan")
    p = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    res = runner.invoke(app, _args(p))
    assert res.exit_code == 1 and "rows 3" in res.stderr
    p1 = tmp_path / "one.parquet"
    pq.write_table(pa.Table.from_pylist([{"pid": i, "helpful": 1.0, "safe": 0.0, "toxic": 0.0} for i in range(5)]), p1)
    res = runner.invoke(app, _args(p1))
    assert res.exit_code == 1 and "fewer than two responses" in res.stderr


def test_sweep_writes_plot_and_json(scores_path, tmp_path):
    plot = tmp_path / "sweep.png"
    args = ["sweep", str(scores_path), "--reward", "helpful", "--prompt-id", "pid", "--constraint", "safe=0.2",
            "--cost", "toxic=0.1", "--beta", "0.5", "--values", "0:3:7", "--plot", str(plot), "--json"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    statuses = [p["status"] for p in out["points"]]
    assert statuses[0] == "converged" and statuses[-1] == "infeasible"
    lams = [p["lambda"]["safe"] for p in out["points"] if p["status"] == "converged"]
    assert lams == sorted(lams)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_end_to_end_process(scores_path, tmp_path):
    """A real process: exit codes and stderr as a shell user sees them."""
    env = {k: v for k, v in os.environ.items() if k != "CAN_NO_CACHE"}  # as a user runs it: the compile cache on
    env["CAN_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "train.cli", *_args(scores_path, "--json")]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["converged"] is True
    bad_cmd = [sys.executable, "-m", "train.cli", *_args(scores_path, safe="safe=50")]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: infeasible") and "Traceback" not in bad.stderr


def test_demo_runs(tmp_path):
    res = runner.invoke(app, ["demo", "--synthetic", "--out", str(tmp_path / "d"), "--prompts", "2000"])
    assert res.exit_code == 0, res.output
    cert = json.loads((tmp_path / "d" / "certificate.json").read_text())
    assert cert["converged"] and set(cert["lambda"]) == {"harmlessness", "honesty", "toxicity"}
    assert (tmp_path / "d" / "sweep.png").exists()


def test_dual_on_two_devices_records_them_and_agrees(scores_path, tmp_path):
    """Issue 22: `can dual` shards prompts over every local JAX device (here 2 CPU devices, set before JAX starts:
    a subprocess) and records them; λ*, the bias block and the predicted gains equal the 1-device run's to 1e-9."""
    certs = {}
    for n in (1, 2):
        env = {k: v for k, v in os.environ.items() if k != "CAN_NO_CACHE"}  # this test checks the cache
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", CAN_CACHE_DIR=str(tmp_path / "cache"))
        out = tmp_path / f"cert{n}.json"
        proc = subprocess.run([sys.executable, "-m", "train.cli", *_args(scores_path, "--out", str(out))], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        certs[n] = json.loads(out.read_text())
    assert certs[1]["devices"]["count"] == 1 and certs[2]["devices"]["count"] == 2
    assert certs[2]["devices"]["platform"] == "cpu"
    for name in ("safe", "toxic"):
        assert abs(certs[2]["lambda"][name] - certs[1]["lambda"][name]) <= 1e-9 * max(1, abs(certs[1]["lambda"][name]))
        b1, b2 = certs[1]["bias"]["lambda"][name], certs[2]["bias"]["lambda"][name]
        assert abs(b2["corrected"] - b1["corrected"]) <= 1e-9 * max(1, abs(b1["corrected"]))
    assert abs(certs[2]["predicted"]["kl"] - certs[1]["predicted"]["kl"]) <= 1e-9
    # The compile cache was written by the first run and is where --no-cache would not look.
    assert any((tmp_path / "cache" / "jax").iterdir())
    res = runner.invoke(app, _args(scores_path, "--devices", "3"))
    assert res.exit_code == 1 and "devices must be between 1 and" in res.output
