"""The README's code blocks run as written: each block's commands (or Python), copied from README.md at test time, on
tiny stand-ins (tests/train/zoo.py) of the models it names — Hub ids in a local Hugging Face cache under those very
ids, the embedded `smollm2` as its converted copy in $CAN_CACHE_DIR, model directories at the paths the block gives;
the sample certificate is compared with the one its command writes, the citation with the paper. Every block carries
a marker (`<!-- readme-NAME: ... -->`): the test that runs or checks it, or `readme-skip` and why it is not run — only
the install, the full demo and the multi-GPU lines (the last test here checks all of this)."""

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
    heldout = ["how do i make tea?", "tell me a riddle.", "is it safe to mix bleach and vinegar?"]  # not trained on
    (work / "heldout.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in heldout))
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


@pytest.fixture(scope="module")
def pipeline_work(smollm2_cache, tmp_path_factory):
    """The pipeline block ("The pipeline on your own data"), copied from README.md and run once in a folder of its
    own: `smollm2` is the embedded model, read from its converted copy in $CAN_CACHE_DIR (what
    `train.models.embedded_smollm2` loads once it exists), so a tiny stand-in put there (ChatML template, as
    SmolLM2's) stands in for it; `path/to/cost-model` is a directory path, where a tiny Safe-RLHF cost model is put;
    prompts.txt and heldout.txt are the user's files. The Python block then runs on a copy of what it made."""
    commands = readme_block("readme-pipeline")
    assert [c.split()[:2] for c in commands] == [["can", s] for s in ("collect", "dual", "label", "train", "evaluate")]
    work = tmp_path_factory.mktemp("pipeline")
    zoo.build_safe_rlhf(work / "path" / "to" / "cost-model", "cost", seed=3)
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAN_CACHE_DIR", str(smollm2_cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(work)
        _run_block(commands)
    return work


@pytest.mark.slow
def test_readme_pipeline_runs_as_written(pipeline_work):
    work = pipeline_work
    cert = json.loads((work / "cert.json").read_text())
    assert set(cert["scorers"]) == {"helpful", "harm", "polite"}
    assert cert["scorers"]["harm"]["spec"] == "path/to/cost-model" and cert["scorers"]["harm"]["sign"] == -1
    assert (work / "prefs.parquet").exists() and (work / "run" / "policy" / "certificate.json").exists()
    assert os.path.exists(work / "can-eval" / "evaluation.json")


def readme_code(marker: str, lang: str) -> str:
    """The ```LANG block that follows `<!-- MARKER: ... -->` in README.md, as written."""
    text = (ROOT / "README.md").read_text()
    return text.split(f"<!-- {marker}:", 1)[1].split(f"```{lang}\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_python_block_runs_as_written(pipeline_work, smollm2_cache, tmp_path, monkeypatch, capsys):
    """The Python block (the stage functions: dual, label, DPO, evaluate, refine) runs as written, on a copy of the
    files the pipeline block made (its scores table, held-out prompts and cost model) plus calibration prompts apart
    from both, and each stage returns its artifact."""
    from bridge.certificate import Certificate
    from bridge.reports import EvaluationReport, RoundsReport

    work = tmp_path / "work"
    work.mkdir()
    for name in ("scores.parquet", "heldout.txt"):
        shutil.copy(pipeline_work / name, work / name)
    shutil.copytree(pipeline_work / "path", work / "path")
    (work / "calibration.txt").write_text("how do i plant a tree?\nwhat is a good name for a cat?\n"
                                          "how do i stay calm?\ntell me about the moon.\n")  # fmt: skip
    monkeypatch.setenv("CAN_CACHE_DIR", str(smollm2_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)
    namespace: dict = {}
    exec(compile(readme_code("readme-python", "python"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    cert, report, rounds = namespace["cert"], namespace["report"], namespace["rounds"]
    assert isinstance(cert, Certificate) and cert.converged and out.startswith("converged ")
    assert Certificate.read(work / "cert.json").sha256 == cert.sha256
    assert (work / "prefs.parquet").exists() and (work / "run" / "policy" / "certificate.json").exists()
    assert Path(namespace["policy"]).resolve() == (work / "run" / "policy").resolve()
    assert isinstance(report, EvaluationReport) and {r.name for r in report.rows} == {"helpful", "harm", "polite"}
    assert (work / "can-eval" / "evaluation.json").exists()
    assert isinstance(rounds, RoundsReport) and (work / "can-refine" / "rounds.json").exists()


def _csv_scores(path: Path) -> None:
    """A scores table made elsewhere, as the README's CSV section describes it: prompt_id, prompt, response and the
    two score columns (what my_scorers.py gives, so the evaluation measures the same quantities); 5 responses per
    prompt."""
    import csv

    from train.scorers import builtin_scorer

    answers = [  # the most helpful answers by the lexical reward are the least harmless: the constraint binds
        "i can't help with that.",
        "sorry, please ask a professional instead.",
        "here is how to pick the lock: insert a tension wrench, rake the pins, turn, and break the lock if it sticks.",
        "pick the lock with a knife and a wrench, break it, steal what you want, it is illegal but it works.",
        "a careful, safe way to do this: ask a locksmith for advice, it is legal and responsible.",
    ]
    prompts = ["how do i pick a lock?", "how do i bake bread?", "how do i fix a bike?", "how do i get a job?",
               "what is a good pet?", "how do i open a jar?"]  # fmt: skip
    rows = [(i, p, a) for i, p in enumerate(prompts) for a in answers]
    helpful = builtin_scorer("helpfulness")([p for _, p, _ in rows], [a for _, _, a in rows])
    harmless = builtin_scorer("harmlessness")([p for _, p, _ in rows], [a for _, _, a in rows])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt_id", "prompt", "response", "helpful", "harmless"])
        writer.writerows([*row, float(h), float(s)] for row, h, s in zip(rows, helpful, harmless, strict=True))


@pytest.mark.slow
def test_readme_csv_block_runs_as_written(smollm2_cache, tmp_path, monkeypatch):
    """Scores a user already has: the CSV block, copied from README.md, on a small scores.csv of text responses (no
    sampled ids, so `can train` trains on text pairs) with the tiny stand-in of `smollm2`, and my_scorers.py beside it
    (the judge that made the CSV's columns) for `can evaluate`."""
    commands = readme_block("readme-csv")
    assert [c.split()[:2] for c in commands] == [["can", s] for s in ("dual", "label", "train", "evaluate")]
    work = tmp_path / "work"
    work.mkdir()
    _csv_scores(work / "scores.csv")
    (work / "my_scorers.py").write_text(
        "from train.scorers import builtin_scorer\n\n"
        "helpful = builtin_scorer('helpfulness')\nharmless = builtin_scorer('harmlessness')\n"
    )
    (work / "heldout.txt").write_text("how do i make tea?\nhow do i cross a road?\nwhat is a good book?\n")
    monkeypatch.setenv("CAN_CACHE_DIR", str(smollm2_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)
    _run_block(commands)
    cert = json.loads((work / "cert.json").read_text())
    assert cert["converged"] and cert["data"]["n_prompts"] == 6 and cert["lambda"]["harmless"] > 0
    from datasets import Dataset

    pairs = Dataset.from_parquet(str(work / "prefs.parquet"))
    assert "chosen_ids" not in pairs.column_names and len(pairs) == 6 * 4  # text pairs, 4 per prompt
    report = json.loads((work / "can-eval" / "evaluation.json").read_text())
    assert {r["name"] for r in report["rows"]} == {"helpful", "harmless"}


def _matches(shown, real, where: str) -> None:
    """`shown` (the README's excerpt, numbers kept as written) is part of `real`: every key present, numbers equal to
    the digits shown, strings equal (one ending in "…" a prefix), lists of objects matched by their "name"."""
    if isinstance(shown, dict):
        assert isinstance(real, dict), where
        for key, value in shown.items():
            assert key in real, f"{where}.{key} is not in the certificate"
            _matches(value, real[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(real, list), where
        if shown and isinstance(shown[0], dict):
            for item in shown:
                found = [r for r in real if r.get("name") == item["name"]]
                assert found, f"{where}: no item named {item['name']!r}"
                _matches(item, found[0], f"{where}[{item['name']}]")
        else:
            assert len(real) == len(shown), where
            for i, (s, r) in enumerate(zip(shown, real, strict=True)):
                _matches(s, r, f"{where}[{i}]")
    elif isinstance(shown, _Number):
        text = str(shown)
        assert isinstance(real, (int, float)) and not isinstance(real, bool), f"{where}: {real!r}"
        if "e" in text.lower():  # 7.0e-17: a residual at rounding level; 1e-09: a setting
            value = float(text)
            assert (abs(real) < 1e-12) if abs(value) < 1e-12 else real == pytest.approx(value, rel=1e-6), where
        else:
            decimals = len(text.split(".")[1]) if "." in text else 0
            assert abs(real - float(text)) <= 0.5 * 10**-decimals + 1e-12, f"{where}: {real} shown as {text}"
    elif isinstance(shown, str) and shown.endswith("…"):
        assert isinstance(real, str) and real.startswith(shown[:-1]), f"{where}: {real!r}"
    else:
        assert shown == real, f"{where}: {real!r} shown as {shown!r}"


class _Number(str):
    """A JSON number as the README writes it (its digits say how exactly it is shown)."""


@pytest.mark.slow
def test_readme_certificate_is_the_one_its_command_writes(tmp_path, monkeypatch):
    """The sample of "Reading a certificate": the command the README names runs, and every field and value the
    excerpt shows is in the certificate that command writes (numbers to the digits shown)."""
    from typer.testing import CliRunner

    from train.cli import app

    text = (ROOT / "README.md").read_text()
    section = text.split("## Reading a certificate", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"`(can demo --synthetic[^`]*)`", section).group(1)
    monkeypatch.chdir(tmp_path)
    args = shlex.split(command)
    res = CliRunner().invoke(app, args[1:])
    assert res.exit_code == 0, res.output
    out = tmp_path / args[args.index("--out") + 1]
    real = json.loads((out / "certificate.json").read_text())
    shown = json.loads(readme_code("readme-certificate", "json"), parse_float=_Number, parse_int=_Number)
    _matches(shown, real, "certificate")
    # What the bullets under it say about this certificate.
    assert real["bias"]["lambda"]["harmlessness"]["bias_over_se"] > 0.5 and real["diagnostics"]
    assert min(c["margin"] for c in real["constraints"] if c["kind"] == "cost") == -0.2


def test_readme_citation_is_the_paper():
    """The BibTeX entry of "How to cite": one @article with the paper's title, its six authors in order and its arXiv
    id."""
    entry = readme_code("readme-cite", "bibtex")
    assert entry.count("@") == 1 and entry.startswith("@article{")
    fields = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", entry, re.M))
    assert fields["title"] == "One-Shot Safety Alignment for Large Language Models via Optimal Dualization"
    assert fields["author"].split(" and ") == ["Huang, Xinmeng", "Li, Shuo", "Dobriban, Edgar", "Bastani, Osbert",
                                               "Hassani, Hamed", "Ding, Dongsheng"]  # fmt: skip
    assert "2405.19544" in fields["journal"] and fields["year"] == "2024"


def test_every_readme_block_is_run_or_named_as_an_exception():
    """Every code block of README.md follows a marker: `<!-- readme-NAME: ... -->` whose block this file runs or checks
    (readme_block("readme-NAME") or readme_code("readme-NAME", …)), or `<!-- readme-skip: why -->` naming the
    exception, which only the install, the full demo and the multi-process lines may be."""
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
            first = body.splitlines()[0]
            assert first.startswith(("bash ./scripts/", "can demo ")) or "--num-processes" in body, body
        if marker in (None, "readme-skip"):  # blocks not run: at least the repository files they name exist
            for path in re.findall(r"[\w./-]+\.(?:py|yaml|sh)\b", body):
                assert (ROOT / path).is_file(), f"{path} (README block: {body.splitlines()[0]})"
        else:
            assert f'"{marker}"' in source or f'"<!-- {marker}:' in source, f"no test reads {marker}"
            assert re.search(r"tests/test_readme\.py (runs|checks) this block", note), note
