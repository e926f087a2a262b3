"""Issue 24: quiet by default. A collect → label → train → evaluate chain on the tiny local model, each stage a
fresh `python -m train.cli` process as a user runs it, prints no library warning, progress bar of weight loading or
`datasets`, or notice on stderr; `--verbose` (anywhere on the line) shows them again. `train` prints metric lines of
numbers, `collect` says how many shards a resumed run reused."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]
LEN = "len=tests.train.toy_scorers:length"
E = "e=tests.train.toy_scorers:e_share"
PROMPTS = ["how do i bake bread?", "tell me a joke.", "is it safe to mix bleach?", "what is the capital of france?"]
# What the libraries print when they are not silenced (transformers 5.25, datasets 5, accelerate 1.16).
NOISE = ("Warning", "warnings.warn", "Loading weights", "Writing model shards", "Saving the dataset", "Filter",
         "Map", "it/s]", "examples/s", "deprecated", "accelerate", "torch.distributed")  # fmt: skip


def _can(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                                                            "HF_DATASETS_DISABLE_PROGRESS_BARS")}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, "-m", "train.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _quiet(res, stage):
    """Nothing on stderr but our own `warning: …` lines, and none of the libraries' output anywhere."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("warning: ") for ln in lines), f"{stage} stderr:\n{res.stderr}"
    for text in NOISE:
        assert text not in res.stderr and text not in res.stdout, f"{stage}: {text!r} in\n{res.stderr}{res.stdout}"


def test_model_stages_print_no_library_output_without_verbose(tiny_lm, tmp_path):
    from bridge.dual import DualConfig, run

    _, _, model = tiny_lm
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS * 2) + "\n")
    collect = ["collect", "prompts.txt", "--policy", model, "-s", LEN, "-s", E, "--k", "4", "--max-new-tokens", "6",
               "--shard-size", "4", "-o", "s.parquet"]  # fmt: skip
    res = _can(*collect, cwd=tmp_path)
    _quiet(res, "collect")
    assert "scores written to s.parquet" in res.stdout and "resumed" not in res.stdout
    # a resumed run says in one line how many shards it reused
    (tmp_path / "s.parquet").unlink()
    (tmp_path / "s.parquet.shards" / "shard-00001.parquet").unlink()
    res = _can(*collect, "--verbose", cwd=tmp_path)
    assert "resumed: 1 of 2 shards reused" in res.stdout, res.stdout
    assert "Loading weights" in res.stderr  # --verbose, given after the command, shows the libraries again

    cert = run(DualConfig(str(tmp_path / "s.parquet"), "len", 0.5, constraint=["e=0.01"]))
    cert.write(tmp_path / "cert.json")
    res = _can("label", "s.parquet", "cert.json", "--mode", "soft", "-o", "prefs.parquet", cwd=tmp_path)
    _quiet(res, "label")
    res = _can("train", "prefs.parquet", "--policy", model, "--out", "run", "--batch-size", "2", "--max-length", "48",
               "--precision", "fp32", "--max_steps", "2", "--logging_steps", "1", cwd=tmp_path)  # fmt: skip
    _quiet(res, "train")
    metrics = [ast.literal_eval(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert metrics and "loss" in metrics[0] and "rewards/margins" in metrics[0], res.stdout
    assert all(isinstance(v, (int, float)) for m in metrics for v in m.values()), metrics  # numbers, not strings
    res = _can("evaluate", "run/policy", "prompts.txt", "--reference", model, "-s", LEN, "-s", E, "--k", "2",
               "--max-new-tokens", "4", "-o", "eval", cwd=tmp_path)  # fmt: skip
    _quiet(res, "evaluate")


def test_metric_lines_are_numbers():
    from train.trainer import metric_line

    line = metric_line({"loss": 0.693147, "rewards/margins": 2.5754e-05, "epoch": 1, "total_flos": 3.0, "x": "s"})
    assert ast.literal_eval(line) == {"loss": 0.6931, "rewards/margins": 2.575e-05, "epoch": 1, "x": "s"}
