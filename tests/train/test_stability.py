"""`can stability` and the certificate's bias block (issue #14): subsampling, the verdict, the JSON block."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from bridge.bias import SMALL, bias_block
from tests.conftest import make_groups
from train.cli import app
from train.cli.stability import subsample_masks, verdict

runner = CliRunner()
GROUPS = make_groups(7, 80, 8, 2, k_min=8)


@pytest.fixture(scope="module")
def scores_path(tmp_path_factory):
    rows = [
        {"pid": i, "helpful": r[k], "safe": g[k, 0], "honest": g[k, 1]}
        for i, (r, g) in enumerate(GROUPS)
        for k in range(len(r))
    ]
    path = tmp_path_factory.mktemp("data") / "scores.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_subsample_masks_keep_k_responses_and_a_fraction_of_prompts():
    mask = np.ones((10, 6), bool)
    mask[3, 4:] = False  # a ragged prompt with 4 responses
    pts = subsample_masks(mask, [2, 6], [0.5, 1.0], seed=1)
    assert [(k, f) for k, f, _, _ in pts] == [(2, 0.5), (6, 0.5), (2, 1.0), (6, 1.0)]
    for k, f, m, w in pts:
        assert np.all(m.sum(1) == np.minimum(k, mask.sum(1)))
        assert not np.any(m & ~mask)
        assert w.sum() == round(f * 10)
    # nested: the K = 2 responses are among the K = 6 ones
    assert np.all(pts[2][2] <= pts[3][2])


def entry(plain, ratio):
    return {"plain": plain, "bias": ratio * 0.1, "corrected": plain - ratio * 0.1, "bias_over_se": ratio}


def test_verdict_names_the_worst_estimate_and_the_k_needed():
    row = {"k": 16, "fraction": 1.0, "k_mean": 16.0, "lambda": {"a": entry(1.0, 0.2), "b": entry(0.0, 9.0)},
           "gain": {"a": entry(0.3, 0.1), "b": entry(0.2, 0.1)}, "kl": entry(0.5, 0.3),
           "reward_gain": entry(0.4, 0.1)}  # fmt: skip
    ok, why = verdict([row], ["a", "b"])  # λ[b] = 0 is not active: its ratio does not count
    assert ok and "K is enough" in why
    row["lambda"]["a"] = entry(1.0, 2.0)
    ok, why = verdict([row], ["a", "b"])
    assert not ok and "λ[a]" in why and f"K ≥ {int(np.ceil(16 * 2.0 / SMALL))}" in why


def test_bias_block_is_json_and_warns_on_large_bias():
    import jax.numpy as jnp

    from can_jax.bias import BiasReport, Corrected

    def c(*v):
        return Corrected(*(jnp.asarray(x) for x in v))

    rep = BiasReport(
        lam=c([2.0, 0.0], [0.5, 0.0], [1.5, 0.0], [0.1, np.nan], [0.1, np.nan]),
        utility_gain=c([0.3, 0.4], [-0.01, 0.0], [0.31, 0.4], [0.05, 0.05], [0.05, 0.05]),
        reward_gain=c(1.0, 0.0, 1.0, 0.1, 0.1),
        kl=c(0.5, -0.2, 0.7, 0.05, 0.04),
        prompts_corrected=jnp.asarray(9),
        prompts=jnp.asarray(10),
    )
    block = bias_block(rep, ["safe", "honest"])
    json.dumps(block, allow_nan=False)
    lam = block["lambda"]["safe"]
    assert lam["bias_over_se"] == pytest.approx(5.0)
    assert lam["interval_95"] == pytest.approx([1.5 - 1.96 * 0.1, 1.5 + 1.96 * 0.1], rel=1e-3)
    assert block["lambda"]["honest"]["standard_error"] is None and block["lambda"]["honest"]["interval_95"] is None
    text = " ".join(block["warnings"])
    assert "λ[safe] 2 → 1.5 (5.0 s.e.)" in text and "KL 0.5 → 0.7" in text and "honest" not in text
    assert len(block["warnings"]) == 2 and "1 prompt(s)" in block["warnings"][1]


def test_stability_command_json_and_plot(scores_path, tmp_path):
    plot = tmp_path / "stab.png"
    args = ["stability", str(scores_path), "--reward", "helpful", "--prompt-id", "pid", "--constraint", "safe=0.2",
            "--constraint", "honest=0.1", "--beta", "0.5", "--fractions", "0.5,1", "--plot", str(plot)]  # fmt: skip
    args.append("--json")
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert isinstance(out["enough"], bool) and out["verdict"].startswith("K is")
    assert {(p["k"], p["fraction"]) for p in out["points"]} == {(k, f) for k in (2, 4, 8) for f in (0.5, 1.0)}
    assert all(p["status"] == "converged" for p in out["points"])
    full = next(p for p in out["points"] if p["k"] == 8 and p["fraction"] == 1.0)
    assert full["prompts"] == 80 and full["k_mean"] == 8.0
    assert plot.stat().st_size > 1000


def test_stability_takes_absolute_limits_like_dual(scores_path):
    """`--at-least COL=τ` is the margin τ − E_ref[COL] on these samples (issue 24): the same points as the relative
    margin computed here independently from the table."""
    rows = pq.read_table(scores_path).to_pylist()
    by = {}
    for r in rows:
        by.setdefault(r["pid"], []).append(r["safe"])
    e_ref = float(np.mean([np.mean(v) for v in by.values()]))  # mean over prompts of each prompt's mean
    common = ["--reward", "helpful", "--prompt-id", "pid", "--beta", "0.5", "--fractions", "1", "--no-plot", "--json"]
    limit = runner.invoke(app, ["stability", str(scores_path), "--at-least", f"safe={e_ref + 0.2!r}", *common])
    margin = runner.invoke(app, ["stability", str(scores_path), "--constraint", "safe=0.2", *common])
    assert limit.exit_code == 0 and margin.exit_code == 0, limit.output + margin.output
    a, b = json.loads(limit.stdout)["points"], json.loads(margin.stdout)["points"]
    assert [p["k"] for p in a] == [p["k"] for p in b]
    for p, q in zip(a, b):
        np.testing.assert_allclose(p["lambda"]["safe"]["plain"], q["lambda"]["safe"]["plain"], rtol=1e-8)
    bad = runner.invoke(app, ["stability", str(scores_path), "--cost-at-most", "safe", *common])
    assert bad.exit_code == 1 and "--cost-at-most" in bad.stderr
