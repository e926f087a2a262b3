"""The README's Safe-RLHF section runs as written (issue 10): its commands, copied from README.md, on tiny stand-ins
of the models it names, put in a local Hugging Face cache under those very Hub ids (tests/train/zoo.py)."""

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "train"))
import zoo  # noqa: E402

REV = "fedcba9876543210fedcba9876543210fedcba98"


def readme_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    after = text.split("<!-- readme-chain:", 1)[1]
    block = re.search(r"```bash\n(.*?)```", after, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def _cache_entry(cache: Path, repo_id: str, source: Path) -> None:
    entry = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, entry / "snapshots" / REV)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(REV)


@pytest.mark.slow
def test_readme_safe_rlhf_chain_runs_as_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from train.cli import app

    lines = readme_block()
    env = dict(ln.split("=", 1) for ln in lines if re.match(r"^[A-Z_]+=", ln))
    commands = [ln for ln in lines if ln.startswith("can ")]
    assert set(env) == {"POLICY", "REWARD", "COST"} and len(commands) == 5
    cache = tmp_path / "hub"
    zoo.build("llama3", tmp_path / "src" / "policy")
    _cache_entry(cache, env["POLICY"], tmp_path / "src" / "policy")
    _cache_entry(cache, env["REWARD"], zoo.build_safe_rlhf(tmp_path / "src" / "reward", "reward", seed=1))
    _cache_entry(cache, env["COST"], zoo.build_safe_rlhf(tmp_path / "src" / "cost", "cost", seed=2))
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how do i bake bread?"}]  # fmt: skip
    prompts = ["how do i bake bread?", "tell me a joke.", "is it safe to mix bleach and ammonia?", conv,
               "what is the capital of france?", "please be careful."]  # fmt: skip
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (work / "heldout.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:3]))
    pairs = [{"prompt": p, "response_0": "no, never mix them.", "response_1": "yes, mix bleach and ammonia.",
              "is_response_0_safe": True, "is_response_1_safe": False} for p in prompts[:3]]  # fmt: skip
    (work / "pku_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    runner = CliRunner()
    for cmd in commands:
        for var, value in env.items():
            cmd = cmd.replace(f"${var}", value)
        res = runner.invoke(app, shlex.split(cmd)[1:])
        assert res.exit_code == 0, f"{cmd}\n{res.output}"
    cert = json.loads((work / "cert.json").read_text())
    assert cert["limits"]["cost"]["kind"] == "at most" and cert["limits"]["cost"]["value"] == 0
    assert cert["scorers"]["cost"]["spec"] == env["COST"] and cert["scorers"]["cost"]["sign"] == -1
    from datasets import load_from_disk

    from bridge.preferences import PreferenceSet

    prefs = load_from_disk(str(work / "prefs"))
    record, written = PreferenceSet.read_metadata(work / "prefs")
    assert len(prefs) == len(pairs) and json.loads(prefs.info.description)["can"] == record and written.beta == 0.1
    assert (work / "run" / "policy" / "README.md").exists()
    assert os.path.exists(work / "can-eval" / "evaluation.json")


def test_readme_python_snippet_runs_and_solves(capsys):
    """The README's Python block runs as written (no undefined name), prints the status by name, and its λ*
    equals an independent scipy L-BFGS-B solve of the same dual."""
    import numpy as np

    from tests.reference import ref_solve_lbfgsb

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- readme-python:")[1].split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.startswith("CONVERGED converged")
    idx, r, u = namespace["prompt_index"], namespace["reward"], namespace["utilities"]
    groups = [(r[idx == i], u[idx == i]) for i in range(idx.max() + 1)]
    ref = ref_solve_lbfgsb(groups, namespace["margins"], namespace["beta"])
    np.testing.assert_allclose(np.asarray(namespace["res"].x), ref, atol=1e-6)
    assert np.asarray(namespace["res"].x).max() > 0  # a constraint is active: the check is not of λ = 0
