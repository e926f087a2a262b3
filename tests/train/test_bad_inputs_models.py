"""Issue 23: the model stages (collect, label on pairs, train, evaluate, stability) on bad input — one `error: …`
line and a non-zero exit, never a traceback, never a wrong answer with exit 0, never a good output destroyed. On the
tiny local model of tests/train/conftest.py; most refusals come before any model is loaded."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from train.cli import app  # noqa: E402

runner = CliRunner()
PROMPTS = ["how do i bake bread?", "tell me a joke.", "is it safe to mix bleach?"]
LEN = "len=tests.train.toy_scorers:length"
E = "e=tests.train.toy_scorers:e_share"
PAIRS = {
    "prompt": ["how do i bake bread?", "is it safe to mix bleach and ammonia?", "tell me a joke."] * 2,
    "chosen": [" mix flour and water.", " no, never.", " why did the chicken cross the road?"] * 2,
    "rejected": [" bake it.", " yes.", " paris is the capital of france."] * 2,
    "p_chosen": [0.9, 0.6, 0.75] * 2,
}


def _fails(res, *expect):
    """One `error: …` line on stderr, exit 1, no traceback; each of `expect` in it."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    # (a model loaded before the refusal may have drawn a progress bar on stderr first)
    lines = [ln for ln in res.stderr.strip().splitlines() if "error" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.stderr.strip().endswith(lines[0])
    for text in expect:
        assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def world(tiny_lm, tmp_path_factory):
    """Prompts, a real certificate (reward `len`, constraint `e`, β = 0.5), a soft preference set labelled under
    it, and an 'aligned' policy folder (the tiny model with the certificate beside it)."""
    from bridge.certificate import write_beside
    from bridge.dual import DualConfig, run
    from bridge.preferences import PreferenceSet

    _, _, model = tiny_lm
    d = tmp_path_factory.mktemp("bad-models")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rng = np.random.default_rng(0)
    n, k = 40, 4
    h = rng.normal(size=n * k)
    pq.write_table(pa.table({"prompt_id": np.repeat(np.arange(n), k), "len": 2 * h + rng.normal(size=n * k),
                             "e": -h + rng.normal(size=n * k)}), d / "scores.parquet")  # fmt: skip
    cert = run(DualConfig(str(d / "scores.parquet"), "len", 0.5, constraint=["e=0.1"]))
    assert cert.converged
    cert.write(d / "cert.json")
    PreferenceSet(pa.table(PAIRS), {"mode": "soft", "pairs_per_prompt": 1, "seed": 0}, cert).write(d / "prefs.parquet")
    policy = d / "policy"
    shutil.copytree(model, policy)
    write_beside(policy, cert)
    (d / "afile").write_text("not a folder")
    return {"dir": d, "model": str(model), "prompts": str(d / "prompts.txt"), "cert": d / "cert.json",
            "prefs": d / "prefs.parquet", "policy": str(policy), "afile": d / "afile"}  # fmt: skip


def _collect(w, tmp_path, *extra):
    return runner.invoke(app, ["collect", w["prompts"], "--policy", w["model"], "-s", LEN, "--k", "2",
                               "--max-new-tokens", "4", "-o", str(tmp_path / "s.parquet"), *extra])  # fmt: skip


def _evaluate(w, tmp_path, *extra, scorers=(LEN, E)):
    args = ["evaluate", w["policy"], w["prompts"], "--reference", w["model"], "--k", "2", "--max-new-tokens", "4",
            "-o", str(tmp_path / "eval")]  # fmt: skip
    for s in scorers:
        args += ["-s", s]
    return runner.invoke(app, [*args, *extra])


def _train(w, out, *extra, prefs=None):
    return runner.invoke(app, ["train", str(prefs or w["prefs"]), "--policy", w["model"], "--out", str(out),
                               "--batch-size", "2", "--max-length", "48", "--precision", "fp32", *extra])  # fmt: skip


# ---------------------------------------------------------------- collect
@pytest.mark.parametrize(
    "extra, expect",
    [(["--k", "0"], "--k"), (["--k", "1"], "--k"), (["--k", "-3"], "--k"),
     (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-new-tokens", "-1"], "--max-new-tokens"),
     (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-4"], "--batch-size"),
     (["--shard-size", "0"], "--shard-size"), (["--scorer-batch-size", "0"], "--scorer-batch-size"),
     (["--scorer-max-length", "0"], "--scorer-max-length")],
)  # fmt: skip
def test_collect_refuses_bad_numbers(world, tmp_path, extra, expect):
    res = _collect(world, tmp_path, *extra)
    _fails(res, expect)
    assert not (tmp_path / "s.parquet").exists()
    assert not (tmp_path / "s.parquet.shards").exists()  # nothing left that blocks the corrected rerun


def test_collect_output_under_a_file(world):
    res = runner.invoke(app, ["collect", world["prompts"], "--policy", world["model"], "-s", LEN, "--k", "2",
                              "--max-new-tokens", "4", "-o", str(world["afile"] / "o.parquet")])  # fmt: skip
    _fails(res, f"{world['afile']} is a file, not a folder")  # (issue 24: not "file exists")
    res = runner.invoke(app, ["collect", world["prompts"], "--policy", world["model"], "-s", LEN, "--k", "2",
                              "--max-new-tokens", "4", "-o", str(world["afile"] / "deeper" / "o.parquet")])  # fmt: skip
    _fails(res, f"{world['afile']} is a file, not a folder")


@pytest.mark.parametrize(
    "prompt, expect",
    [([{"role": "user", "content": "hi"}], "chat template"),
     ([{"role": "usr", "content": "hi"}], "role 'usr'"),
     ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "assistant's turn"),
     ([{"role": "user", "content": " "}], "empty"), ([{"content": "hi"}], "'role'"), (7, "text or a list")],
)  # fmt: skip
def test_collect_names_the_file_and_line_of_a_bad_conversation(world, tmp_path, prompt, expect):
    """Issue 24: an error about a JSONL conversation names the file and the line (the tiny tokenizer has no chat
    template, so even a good conversation is refused, at its line)."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "bake bread"}, {"prompt": prompt}])
    res = runner.invoke(app, ["collect", str(path), "--policy", world["model"], "-s", LEN, "--k", "2",
                              "--max-new-tokens", "4", "-o", str(tmp_path / "s.parquet")])  # fmt: skip
    _fails(res, f"{path} line 3", expect)


def test_collect_prompt_longer_than_the_context(world, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("hello\n" + " ".join(["bake bread"] * 300) + "\n")  # the tiny model's context is 256
    res = runner.invoke(app, ["collect", str(long), "--policy", world["model"], "-s", LEN, "--k", "2",
                              "--max-new-tokens", "4", "-o", str(tmp_path / "s.parquet")])  # fmt: skip
    _fails(res, "line 2", "256")
    assert not (tmp_path / "s.parquet").exists()


# ---------------------------------------------------------------- evaluate
@pytest.mark.parametrize(
    "extra, expect",
    [(["--k", "0"], "--k"), (["--k", "-1"], "--k"), (["--max-new-tokens", "0"], "--max-new-tokens"),
     (["--scorer-batch-size", "0"], "--scorer-batch-size"), (["--scorer-max-length", "-1"], "--scorer-max-length")],
)  # fmt: skip
def test_evaluate_refuses_bad_numbers(world, tmp_path, extra, expect):
    _fails(_evaluate(world, tmp_path, *extra), expect)


def test_evaluate_needs_a_scorer_for_every_constraint(world, tmp_path):
    _fails(_evaluate(world, tmp_path, scorers=(LEN,)), "'e'")
    _fails(_evaluate(world, tmp_path, scorers=(E,)), "'len'")


def test_evaluate_output_under_a_file_one_prompt_and_a_long_prompt(world, tmp_path):
    res = _evaluate(world, tmp_path, "-o", str(world["afile"] / "eval"))
    _fails(res, "afile")
    one = tmp_path / "one.txt"
    one.write_text("hello\n")
    res = runner.invoke(app, ["evaluate", world["policy"], str(one), "--reference", world["model"], "-s", LEN, "-s", E,
                              "-o", str(tmp_path / "eval")])  # fmt: skip
    _fails(res, "at least 2")
    long = tmp_path / "long.txt"
    long.write_text("hello\n" + " ".join(["bake bread"] * 300) + "\n")
    res = runner.invoke(app, ["evaluate", world["policy"], str(long), "--reference", world["model"], "-s", LEN, "-s",
                              E, "-o", str(tmp_path / "eval")])  # fmt: skip
    _fails(res, "line 2", "256")


# ---------------------------------------------------------------- train
@pytest.mark.parametrize(
    "extra, expect",
    [(["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--epochs", "0"], "epoch"),
     (["--batch-size", "0"], "batch"), (["--batch-size", "-2"], "batch"), (["--max-length", "0"], "max"),
     (["--max_steps", "0", "--epochs", "0"], "epoch")],
)  # fmt: skip
def test_train_refuses_bad_numbers(world, tmp_path, extra, expect):
    res = _train(world, tmp_path / "run", *extra)
    _fails(res, expect)
    assert not (tmp_path / "run" / "policy").exists()


def test_train_out_under_a_file(world):
    _fails(_train(world, world["afile"] / "run"), "afile")


def test_train_malformed_config_leaves_the_run_alone(world, tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "marker").write_text("old")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1e-3\nnum_train_epochs: : 2\n")
    _fails(_train(world, run, "--config", str(bad)), "bad.yaml")
    assert (run / "data" / "marker").read_text() == "old"


def test_train_overwrite_resume_and_foreign_checkpoints(world, tmp_path):
    """A finished policy is refused without --overwrite; --resume refuses checkpoints of another preference set or
    of other settings (the run records what its checkpoints belong to)."""
    from bridge.preferences import PreferenceSet

    run = tmp_path / "run"
    res = _train(world, run, "--max_steps", "2", "--save_steps", "1")
    assert res.exit_code == 0, res.output
    weights = run / "policy" / "model.safetensors"
    before = weights.read_bytes()
    _fails(_train(world, run, "--max_steps", "2"), "--overwrite")
    assert weights.read_bytes() == before
    other = tmp_path / "other.parquet"
    _, cert = PreferenceSet.read_metadata(world["prefs"])
    flipped = {**PAIRS, "chosen": PAIRS["rejected"], "rejected": PAIRS["chosen"]}
    PreferenceSet(pa.table(flipped), {"mode": "soft", "pairs_per_prompt": 1, "seed": 0}, cert).write(other)
    _fails(_train(world, run, "--max_steps", "3", "--resume", prefs=other), "another preference set")
    _fails(_train(world, run, "--max_steps", "3", "--resume", "--lr", "1e-2"), "learning_rate")
    assert weights.read_bytes() == before
    res = _train(world, run, "--max_steps", "3", "--resume")  # the same run continued: allowed
    assert res.exit_code == 0, res.output
    res = _train(world, run, "--max_steps", "1", "--overwrite")
    assert res.exit_code == 0, res.output


def test_train_lora_defaults_to_a_learning_rate_that_moves_the_policy(world, tmp_path):
    """Issue 24: `can train --lora` without --lr trains at 5e-5 (recorded), and the merged policy differs from the
    base weights by more than rounding."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    res = _train(world, run, "--lora", "--max_steps", "2")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "run.json").read_text())["settings"]["learning_rate"] == 5e-5
    base = load_file(f"{world['model']}/model.safetensors")
    tuned = load_file(str(run / "policy" / "model.safetensors"))
    moved = max(float((tuned[k].float() - v.float()).abs().max()) for k, v in base.items() if k in tuned)
    assert moved > 1e-5, moved
    assert "5e-5 with --lora" in " ".join(runner.invoke(app, ["train", "--help"]).output.split())


# ---------------------------------------------------------------- label on pairs
def _label(world, pairs, tmp_path, out="prefs.parquet"):
    return runner.invoke(app, ["label", str(pairs), str(world["cert"]), "--mode", "soft", "-o",
                               str(tmp_path / out)])  # fmt: skip


def _trl_rows(n=4):
    return [{"prompt": f"question {i}?", "chosen": f"answer a{i}", "rejected": f"answer b{i}", "len_chosen": 1.0 + i,
             "len_rejected": 2.0, "e_chosen": 0.1, "e_rejected": 0.2 * i} for i in range(n)]  # fmt: skip


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversational(rows):
    for r in rows:
        r["prompt"] = [{"role": "user", "content": r["prompt"]}]
        r["chosen"] = [{"role": "assistant", "content": r["chosen"]}]
        r["rejected"] = [{"role": "assistant", "content": r["rejected"]}]
    return rows


@pytest.mark.parametrize(
    "conv, edit, expect",
    [(False, {"prompt": ""}, "prompt is empty"), (False, {"prompt": "   "}, "prompt is empty"),
     (False, {"chosen": ""}, "first response is empty"), (False, {"rejected": " "}, "second response is empty"),
     (True, {"chosen": [{"role": "assistant", "content": 5}]}, "content"),
     (True, {"chosen": [{"role": "user", "content": "hi"}]}, "role 'user'"),
     (True, {"rejected": [{"role": "assistant", "content": ""}]}, "second response is empty"),
     (True, {"prompt": [{"role": "assistant", "content": "hi"}]}, "role 'assistant'"),
     (True, {"prompt": [{"role": "user", "content": " "}]}, "prompt is empty")],
)  # fmt: skip
def test_label_refuses_bad_pairs(world, tmp_path, conv, edit, expect):
    rows = _conversational(_trl_rows()) if conv else _trl_rows()
    rows[1].update(edit)
    _fails(_label(world, _jsonl(tmp_path / "pairs.jsonl", rows), tmp_path), expect, "row 1")
    assert not (tmp_path / "prefs.parquet").exists()
    # the same pairs in Parquet: the same refusal
    if not (conv and "content" in expect):  # (Arrow cannot even store that column)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
        _fails(_label(world, tmp_path / "pairs.parquet", tmp_path), expect, "row 1")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize(
    "rename, expect",
    [({"rejected": "rejectd"}, ["'rejected'", "'rejectd'", "TRL layout"]),
     ({"chosen": "choosen"}, ["'chosen'", "'choosen'"]),
     ({"prompt": "promt"}, ["'prompt'", "'promt'"]),
     ({"rejected": None}, ["'rejected'"])],
)  # fmt: skip
def test_label_names_a_missing_or_misspelt_pairs_column(world, tmp_path, fmt, rename, expect):
    """Issue 24: a pairs file with a column missing or misspelt is recognised as pairs before any hash check, and
    the column is named (not "the certificate was computed on another scores table")."""
    rows = [{rename.get(k, k): v for k, v in r.items() if rename.get(k, k) is not None} for r in _trl_rows()]
    path = tmp_path / f"pairs.{fmt}"
    _jsonl(path, rows) if fmt == "jsonl" else pq.write_table(pa.Table.from_pylist(rows), path)
    res = _label(world, path, tmp_path)
    _fails(res, "not a pairs dataset", *expect)
    assert "another scores table" not in res.output
    # PKU's layout, misspelt
    rows = [{"prompt": r["prompt"], "response_0": r["chosen"], "respons_1": r["rejected"]} for r in _trl_rows()]
    _fails(_label(world, _jsonl(tmp_path / "pku.jsonl", rows), tmp_path), "'response_1'", "'respons_1'",
           "PKU-SafeRLHF layout")  # fmt: skip


def test_label_names_misspelt_score_columns(world, tmp_path):
    rows = [{("len_chosn" if k == "len_chosen" else k): v for k, v in r.items()} for r in _trl_rows()]
    _fails(_label(world, _jsonl(tmp_path / "pairs.jsonl", rows), tmp_path), "'len_chosen'", "'len_chosn'")


def test_label_drops_and_counts_identical_responses(world, tmp_path):
    rows = _trl_rows()
    rows[1]["chosen"] = rows[1]["rejected"]
    res = _label(world, _jsonl(tmp_path / "pairs.jsonl", rows), tmp_path)
    assert res.exit_code == 0, res.output
    assert "1 pairs with identical responses dropped" in res.stdout and "3 soft pairs" in res.stdout
    assert pq.read_table(tmp_path / "prefs.parquet").num_rows == 3
    for r in rows:
        r["chosen"] = r["rejected"]
    _fails(_label(world, _jsonl(tmp_path / "same.jsonl", rows), tmp_path, "other.parquet"), "identical")


def test_label_conversational_pairs_with_the_right_roles_pass(world, tmp_path):
    rows = _conversational(_trl_rows())
    rows[0]["prompt"] = [{"role": "system", "content": "be brief"}, *rows[0]["prompt"]]
    res = _label(world, _jsonl(tmp_path / "pairs.jsonl", rows), tmp_path)
    assert res.exit_code == 0, res.output


def test_label_corrupt_datasets_directories(world, tmp_path):
    from datasets import Dataset

    good = tmp_path / "good"
    Dataset.from_list(_trl_rows()).save_to_disk(str(good))
    bare = tmp_path / "bare"
    bare.mkdir()
    _fails(_label(world, bare, tmp_path), str(bare))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "state.json").write_text("{}")
    _fails(_label(world, empty, tmp_path), str(empty))
    nostate = tmp_path / "nostate"
    shutil.copytree(good, nostate)
    (nostate / "state.json").unlink()
    _fails(_label(world, nostate, tmp_path), str(nostate))
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    arrow = next(truncated.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    _fails(_label(world, truncated, tmp_path), str(truncated))
    assert not (tmp_path / "prefs.parquet").exists()
    # an unwritable output: a datasets directory under a file
    res = runner.invoke(app, ["label", str(good), str(world["cert"]), "--mode", "soft", "-o",
                              str(world["afile"] / "prefs")])  # fmt: skip
    _fails(res, "afile")


# ---------------------------------------------------------------- stability
def test_stability_on_one_prompt_is_refused(tmp_path):
    rows = [{"prompt_id": 0, "r": float(x), "u": float(-x)} for x in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "one.parquet")
    res = runner.invoke(app, ["stability", str(tmp_path / "one.parquet"), "--reward", "r", "--constraint", "u=0.1",
                              "--beta", "1", "--no-plot"])  # fmt: skip
    _fails(res, "prompt")


def test_stability_verdict_without_standard_errors_is_not_enough():
    from train.cli.stability import verdict

    none = {"plain": 1.0, "bias_over_se": None}
    row = {"k": 4, "fraction": 1.0, "k_mean": 4.0, "prompts": 2, "lambda": {"u": none}, "gain": {"u": none},
           "kl": none, "reward_gain": none}  # fmt: skip
    ok, reason = verdict([row], ["u"])
    assert not ok and "cannot tell" in reason


def test_collect_failure_leaves_nothing_that_blocks_the_corrected_rerun(world, tmp_path):
    res = _collect(world, tmp_path, "-s", "b=tests.train.toy_scorers:boom")
    _fails(res, "boom")
    assert not list((tmp_path / "s.parquet.shards").glob("shard-*"))
    res = _collect(world, tmp_path)  # other settings, nothing collected before: accepted
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 2 * len(PROMPTS)


@pytest.mark.parametrize(
    "extra, expect",
    [(["--batch-size", "0"], "--batch-size"), (["--max-length", "0"], "--max-length"),
     (["--max-length", "-3"], "--max-length"), (["-o", "AFILE/o.parquet"], "afile")],
)  # fmt: skip
def test_logratios_refuses_bad_numbers_and_paths(world, tmp_path, extra, expect):
    extra = [str(world["afile"] / "o.parquet") if a == "AFILE/o.parquet" else a for a in extra]
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": [0, 0], "prompt": ["hi", "hi"], "response": ["a", "b"]}), table)
    res = runner.invoke(app, ["logratios", str(table), "-a", f"n={world['policy']}@0.5", "--policy", world["model"],
                              "-o", str(tmp_path / "o.parquet"), *extra])  # fmt: skip
    _fails(res, expect)
    assert not (tmp_path / "o.parquet").exists()


# ---------------------------------------------------------------- fuzz
def _outcome_ok(res, written):
    """A fuzzed run either succeeds with its output written, or ends with one `error: …` line (exit 1) and no
    output: never a traceback, never exit 0 without the output."""
    if res.exit_code == 0:
        assert written(), res.output
    else:
        _fails(res)
        assert not written()


def test_fuzz_model_stages_numbers(world, tmp_path_factory):
    """Hypothesis fuzzing of the numeric options of collect, label (pairs), train and evaluate on the tiny model
    (issue 23): any integer or float, including 0, negatives, NaN and huge values."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ints = st.one_of(st.integers(-3, 3), st.sampled_from([-(10**9), 10**9]))
    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-3]))
    opts = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

    @opts
    @given(k=ints, new=ints, batch=ints)
    def collect(k, new, batch):
        out = tmp_path_factory.mktemp("fz") / "s.parquet"
        res = runner.invoke(app, ["collect", world["prompts"], "--policy", world["model"], "-s", LEN, "--k",
                                  str(min(k, 3)), "--max-new-tokens", str(min(new, 3)), "--batch-size",
                                  str(batch), "-o", str(out)])  # fmt: skip
        _outcome_ok(res, out.exists)

    @opts
    @given(k=ints, new=ints)
    def evaluate(k, new):
        out = tmp_path_factory.mktemp("fz") / "eval"
        res = _evaluate(world, out, "--k", str(min(k, 3)), "--max-new-tokens", str(min(new, 3)), "-o", str(out))
        _outcome_ok(res, lambda: (out / "evaluation.json").exists())

    @opts
    @given(lr=floats, epochs=floats, batch=ints)
    def train(lr, epochs, batch):
        out = tmp_path_factory.mktemp("fz") / "run"
        epochs = min(epochs, 1.0) if epochs == epochs else epochs  # keep real runs short
        res = runner.invoke(app, ["train", str(world["prefs"]), "--policy", world["model"], "--out", str(out),
                                  "--lr", repr(lr), "--epochs", repr(epochs), "--batch-size", str(min(batch, 2)),
                                  "--max-length", "48", "--precision", "fp32"])  # fmt: skip
        _outcome_ok(res, lambda: (out / "policy" / "certificate.json").exists())

    @opts
    @given(mode=st.sampled_from(["bt", "soft", "hard", "", "x"]), seed=ints)
    def label(mode, seed):
        out = tmp_path_factory.mktemp("fz") / "p.parquet"
        pairs = tmp_path_factory.mktemp("fz") / "pairs.jsonl"
        pairs.write_text("".join(json.dumps({"prompt": p, "response_0": a, "response_1": b, "len_0": 1.0,
                                             "len_1": 2.0, "e_0": 0.5, "e_1": 0.1}) + "\n"
                                 for p, a, b in zip(PAIRS["prompt"], PAIRS["chosen"], PAIRS["rejected"])))  # fmt: skip
        res = runner.invoke(app, ["label", str(pairs), str(world["cert"]), "--mode", mode, "--seed", str(seed),
                                  "-o", str(out)])  # fmt: skip
        _outcome_ok(res, out.exists)

    for fuzz in (collect, evaluate, label, train):
        fuzz()
