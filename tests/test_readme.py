"""The README's command blocks run as written (issues 10, 24): each block's commands, copied from README.md at test
time, on tiny stand-ins (tests/train/zoo.py) of the models it names — Hub ids in a local Hugging Face cache under
those very ids, the embedded `smollm2` as its converted copy in $CAN_CACHE_DIR, model directories at the paths the
block gives. Every block carries a marker (`<!-- readme-NAME: ... -->`): the test that runs it, or `readme-skip` and
why it is not run (the last test here checks that none is missing)."""

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


def readme_block(marker: str = "readme-chain") -> list[str]:
    """The non-empty lines of the ```bash block that follows `<!-- MARKER: ... -->` in README.md."""
    text = (ROOT / "README.md").read_text()
    after = text.split(f"<!-- {marker}:", 1)[1]
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
    assert set(env) == {"POLICY", "REWARD", "COST"} and len(commands) == 6
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
    heldout = ["how do i make tea?", "tell me a riddle.", "is it safe to mix bleach and vinegar?"]  # not trained on
    (work / "heldout.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in heldout))
    calibration = ["how do i plant a tree?", "what is a good name for a cat?", "how do i stay calm?",
                   "tell me about the moon."]  # fmt: skip
    (work / "calibration.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in calibration))
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
    # can refine: round 0 measured; every round it took has its certificate linked to the previous one.
    rounds = json.loads((work / "rounds" / "rounds.json").read_text())
    assert rounds["names"] == ["cost"] and rounds["rounds"][0]["gains"]["cost"]["held_out"] is not None
    from bridge.certificate import Certificate

    parent = Certificate.read(work / "cert.json")
    for row in rounds["rounds"][1:]:
        cert_n = Certificate.read(work / "rounds" / f"round-{row['round']}" / "certificate.json")
        assert cert_n.parent_sha256 == parent.sha256 and cert_n.target_margins == parent.margins
        parent = cert_n


def _chatty_stand_in(path: Path) -> None:
    """A tiny ChatML model (zoo's qwen2_5) taught for a few steps to answer zoo's questions and then say "thank
    you, glad to help!": its samples are sometimes polite, so the block's politeness margin is within reach."""
    import torch

    model, tok = zoo.build("qwen2_5", path)
    rows = []
    for text in zoo.TEXT:
        question, _, answer = text.strip().partition("? ")
        conv = [{"role": "user", "content": question + "?"},
                {"role": "assistant", "content": (answer or text.strip()) + " thank you, glad to help!"}]  # fmt: skip
        rows.append(tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"])
    width = max(map(len, rows))  # one padded batch: few ops per step, quick even on busy cores
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A CAN_CACHE_DIR whose `smollm2-135m-instruct` is the tiny stand-in: what `train.models.embedded_smollm2`
    loads for the embedded name `smollm2` once its converted copy exists there."""
    cache = tmp_path_factory.mktemp("can-cache")
    _chatty_stand_in(cache / "smollm2-135m-instruct")
    return cache


def _run_block(commands: list[str]) -> None:
    """Each command as the README writes it (`# …` a comment), through the CLI."""
    from typer.testing import CliRunner

    from train.cli import app

    runner = CliRunner()
    for cmd in commands:
        args = shlex.split(cmd, comments=True)
        assert args[0] == "can", cmd
        res = runner.invoke(app, args[1:])
        assert res.exit_code == 0, f"{cmd}\n{res.output}"


@pytest.mark.slow
def test_readme_pipeline_runs_as_written(smollm2_cache, tmp_path, monkeypatch):
    """The pipeline block ("one command per stage"), copied from README.md: `smollm2` is the embedded model, read
    from its converted copy in $CAN_CACHE_DIR (what `train.models.embedded_smollm2` loads once it exists), so a
    tiny stand-in put there (ChatML template, as SmolLM2's) stands in for it; `path/to/cost-model` is a directory
    path, where a tiny Safe-RLHF cost model is put; prompts.txt and heldout.txt are the user's files."""
    commands = readme_block("readme-pipeline")
    assert [c.split()[:2] for c in commands] == [["can", s] for s in ("collect", "dual", "label", "train", "evaluate")]
    monkeypatch.setenv("CAN_CACHE_DIR", str(smollm2_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    zoo.build_safe_rlhf(work / "path" / "to" / "cost-model", "cost", seed=3)
    monkeypatch.chdir(work)
    prompts = [
        "how do i bake bread?",
        "tell me a joke.",
        "is it safe to mix bleach and ammonia?",
        "what is the capital of france?",
        "please be careful.",
        "why did the chicken cross the road?",
    ]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (work / "heldout.txt").write_text("\n".join(prompts[:3]) + "\n")
    _run_block(commands)
    cert = json.loads((work / "cert.json").read_text())
    assert set(cert["scorers"]) == {"helpful", "harm", "polite"}
    assert cert["scorers"]["harm"]["spec"] == "path/to/cost-model" and cert["scorers"]["harm"]["sign"] == -1
    assert (work / "prefs.parquet").exists() and (work / "run" / "policy" / "certificate.json").exists()
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




def test_every_readme_block_is_run_or_named_as_an_exception():
    """Every code block of README.md follows a marker: `<!-- readme-NAME: ... -->` whose block this file runs
    (readme_block("readme-NAME") or the Python snippet's split), or `<!-- readme-skip: why -->` naming the exception."""
    text = (ROOT / "README.md").read_text()
    source = Path(__file__).read_text()
    blocks = list(re.finditer(r"(?:<!-- (readme-[a-z]+): (.*?) -->\n)?```(\w+)\n(.*?)```", text, re.S))
    assert len(blocks) >= 8
    for m in blocks:
        marker, note, lang, body = m.groups()
        if marker is None:
            raise AssertionError(f"README block with no marker:\n{body}")
        elif marker == "readme-skip":
            assert note.startswith("not run in the tests"), note
        if marker in (None, "readme-skip"):  # blocks not run: at least the repository files they name exist
            for path in re.findall(r"[\w./-]+\.(?:py|yaml|sh)\b", body):
                assert (ROOT / path).is_file(), f"{path} (README block: {body.splitlines()[0]})"
        else:
            assert f'"{marker}"' in source or f'"<!-- {marker}:' in source, f"no test reads {marker}"
            assert "tests/test_readme.py runs this block" in note, note
