"""`can evaluate` and the prompt files on inputs that would give a wrong answer: a byte-order mark in a prompt file,
a `can train` run folder given for its policy, scorers other than the certificate's, held-out prompts that are
training prompts. Each is one `error: …` line and a non-zero exit, before any model is loaded."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from can_jax.errors import CanError  # noqa: E402
from train.cli import app  # noqa: E402

runner = CliRunner()
PROMPTS = ["how do i bake bread?", "tell me a joke.", "is it safe to mix bleach?"]
FRESH = ["what is thing 1?", "what is thing 2?"]
LEN = "len=tests.train.toy_scorers:length"
E = "e=tests.train.toy_scorers:e_share"
SPECS = {"len": "tests.train.toy_scorers:length", "e": "tests.train.toy_scorers:e_share"}


def _fails(res, *expect):
    """One `error: …` line on stderr, exit 1, no traceback; each of `expect` in it."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for text in expect:
        assert text in lines[0], lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Loading any policy fails the test: the refusals come before model work."""

    def load_policy(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr("train.models.load_policy", load_policy)


@pytest.fixture(scope="module")
def world(tiny_lm, tmp_path_factory):
    """A scores table whose training prompts are PROMPTS (and more), a certificate solved on it that records the
    scorer specs (reward `len`, constraint `e`), and an aligned policy folder carrying that certificate."""
    from bridge.certificate import Certificate, write_beside
    from bridge.dual import DualConfig, run

    _, _, model = tiny_lm
    d = tmp_path_factory.mktemp("bad-eval")
    rng = np.random.default_rng(0)
    n, k = 40, 4
    h = rng.normal(size=n * k)
    train = PROMPTS + [f"training prompt {i}" for i in range(n - len(PROMPTS))]
    pq.write_table(pa.table({"prompt_id": np.repeat(np.arange(n), k), "instruction": np.repeat(train, k).tolist(),
                             "len": 2 * h + rng.normal(size=n * k), "e": -h + rng.normal(size=n * k)}),
                   d / "scores.parquet")  # fmt: skip
    cert = run(DualConfig(str(d / "scores.parquet"), "len", 0.5, constraint=["e=0.1"]))
    assert cert.converged
    body = cert.to_dict()
    body["scorers"] = {name: {"role": "reward" if name == "len" else "constraint", "sign": 1, "spec": spec,
                              "template": None} for name, spec in SPECS.items()}  # fmt: skip
    cert = Certificate.from_dict(body)
    cert.write(d / "cert.json")
    policy = d / "policy"
    shutil.copytree(model, policy)
    write_beside(policy, cert)
    (d / "fresh.txt").write_text("\n".join(FRESH) + "\n")
    return {"dir": d, "model": str(model), "policy": str(policy), "scores": d / "scores.parquet", "cert": cert}


def _evaluate(policy, prompts, out, *extra, scorers=(LEN, E), reference=None):
    args = ["evaluate", str(policy), str(prompts), "--k", "2", "--max-new-tokens", "4", "-o", str(out)]
    if reference is not None:
        args += ["--reference", reference]
    for s in scorers:
        args += ["-s", s]
    return runner.invoke(app, [*args, *extra])


# ---------------------------------------------------------------- a byte-order mark in a prompt file
def test_read_prompts_strips_a_byte_order_mark(tmp_path):
    from train.prompts import read_prompts

    txt = "\n".join(PROMPTS) + "\n"
    jsonl = "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
    for name, text in (("p.txt", txt), ("p.jsonl", jsonl)):
        plain, bom = tmp_path / name, tmp_path / f"bom-{name}"
        plain.write_text(text, encoding="utf-8")
        bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert read_prompts(bom) == read_prompts(plain) == PROMPTS
    conv = [{"role": "user", "content": "hi"}]
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps({"prompt": conv}) + "\n").encode())
    assert read_prompts(tmp_path / "c.jsonl") == [conv]  # line 1 is still JSON, not "\ufeff{...}"


def test_a_bom_only_file_has_no_prompts(tmp_path):
    from train.prompts import read_prompts

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(CanError, match="no prompts"):
        read_prompts(tmp_path / "p.txt")


# ---------------------------------------------------------------- a run folder for its policy
def test_evaluate_refuses_a_run_folder_naming_its_policy(world, tmp_path, no_model):
    run = tmp_path / "run"
    (run / "policy").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    fresh = world["dir"] / "fresh.txt"
    _fails(_evaluate(run, fresh, tmp_path / "eval"), f"{run} is a run folder: evaluate {run / 'policy'}")
    # also when a certificate is named for it
    res = runner.invoke(app, ["evaluate", str(run), str(world["dir"] / "cert.json"), str(fresh), "-s", LEN, "-s", E,
                              "-o", str(tmp_path / "eval")])  # fmt: skip
    _fails(res, f"evaluate {run / 'policy'}")
    assert not (tmp_path / "eval").exists()


def test_a_policy_folder_is_not_a_run_folder(world):
    from train.evaluate import check_policy_folder

    check_policy_folder(world["policy"])  # the model folder itself
    check_policy_folder("smollm2")  # a name, not a folder


# ---------------------------------------------------------------- scorers other than the certificate's
def test_evaluate_refuses_a_scorer_spec_other_than_the_certificates(world, tmp_path, no_model):
    fresh = world["dir"] / "fresh.txt"
    other = "e=tests.train.toy_scorers:length"
    res = _evaluate(world["policy"], fresh, tmp_path / "eval", scorers=(LEN, other))
    _fails(res, f"-s {other}", "the certificate's 'e' was scored with 'tests.train.toy_scorers:e_share'")
    # the certificate named beside a policy that carries none: checked the same way
    res = runner.invoke(app, ["evaluate", world["model"], str(world["dir"] / "cert.json"), str(fresh), "-s", LEN,
                              "-s", other, "-o", str(tmp_path / "eval")])  # fmt: skip
    _fails(res, "'e'")
    # the recorded specs pass: the next refusal is the missing prompt file's, still before any model
    _fails(_evaluate(world["policy"], tmp_path / "none.txt", tmp_path / "eval"), "prompt file not found")


# ---------------------------------------------------------------- training prompts as held-out prompts
def test_evaluate_refuses_training_prompts_of_train_scores(world, tmp_path, no_model):
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{FRESH[0]}\nhow do i  bake bread? \n")  # a training prompt, spaced otherwise
    res = _evaluate(world["policy"], mixed, tmp_path / "eval", "--train-scores", str(world["scores"]))
    _fails(res, "1 of the 2 held-out prompts are training prompts", "'how do i bake bread?'",
           "--allow-training-prompts")  # fmt: skip
    conv = tmp_path / "conv.jsonl"  # a conversation of one user turn is that text
    rows = [{"prompt": [{"role": "user", "content": "tell me a joke."}]}, {"prompt": FRESH[1]}]
    conv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = _evaluate(world["policy"], conv, tmp_path / "eval", "--train-scores", str(world["scores"]))
    _fails(res, "1 of the 2 held-out prompts are training prompts")
    assert not (tmp_path / "eval").exists()


def test_fresh_prompts_pass_the_training_prompt_check(world):
    from train.evaluate import check_held_out

    check_held_out(FRESH, world["scores"])
    with pytest.raises(CanError, match="2 of the 3 held-out prompts"):
        check_held_out([*FRESH[:1], *PROMPTS[:2]], world["scores"])


def test_allow_training_prompts_measures_on_them(world, tmp_path):
    """With --allow-training-prompts the evaluation runs on training prompts of --train-scores (here a table
    collected from the tiny model on PROMPTS), gains on the training samples included."""
    from train.collect import CollectConfig, collect

    f = tmp_path / "train.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    table = collect(CollectConfig(prompts=str(f), policy=world["model"], scorers=[LEN, E], k=2, max_new_tokens=4),
                    tmp_path / "s.parquet")  # fmt: skip
    args = ("--train-scores", str(table))
    _fails(_evaluate(world["policy"], f, tmp_path / "eval", *args, reference=world["model"]), "3 of the 3")
    res = _evaluate(world["policy"], f, tmp_path / "eval", *args, "--allow-training-prompts",
                    reference=world["model"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["rows"]
    assert {r["name"] for r in rows} == {"len", "e"}
    assert all(r["insample_gain"] is not None for r in rows)


def test_allow_training_prompts_is_documented():
    res = runner.invoke(app, ["evaluate", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    assert "--allow-training-prompts" in text
    assert "prompts DPO did not see" in text
