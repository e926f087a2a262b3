"""Issue #13, the bridge half: tables, certificates, labels and files refuse bad input in one line, and never
pair, pool or write silently. Issue #9: conversational prompt columns (TRL's list of {role, content})."""

import json
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bridge.certificate import Certificate
from bridge.files import atomic_write_text
from bridge.labels import pseudo_preferences
from bridge.tables import ConstraintSpec, load_scores, read_table
from can_jax.errors import CanError, ScoresFormatError
from tests.reference import ref_solve_lbfgsb

SPECS = [ConstraintSpec("safe", 0.1)]


def _rows(n=30, k=4, seed=0, conversational=False):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"question {i}"}] if conversational else f"question {i}"
        for j in range(k):
            h = rng.normal()
            rows.append({"prompt_id": i, "prompt": prompt, "response": f"a{i}-{j}", "r": 2 * h + rng.normal(),
                         "safe": -0.5 * h + rng.normal()})  # fmt: skip
    return rows


def _write(rows, path):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _cert(path, drop=False):
    from bridge.dual import data_summary, solve

    loaded = load_scores(path, "r", SPECS, drop_bad_rows=drop)
    result, errs, notes, tol = solve(loaded, 1.0, None, 100, True)
    return Certificate.build(result, loaded.names, loaded.kinds, loaded.margins, 1.0,
                             data_summary(loaded, "r", "prompt_id"), standard_errors=errs, tol=tol,
                             standard_error_notes=notes)  # fmt: skip


# ---------------------------------------------------------------- one prompt id ↔ one prompt
def test_one_prompt_id_with_two_prompt_texts_is_refused_by_dual_and_label(tmp_path):
    rows = _rows()
    path = _write(rows, tmp_path / "ok.parquet")
    cert = _cert(path)
    rows[5]["prompt"] = "another question"  # prompt_id 1 now has two texts
    bad = _write(rows, tmp_path / "bad.parquet")
    with pytest.raises(ScoresFormatError, match=r"2 different prompts.*prompt_id 1"):
        load_scores(bad, "r", SPECS)
    with pytest.raises(ScoresFormatError, match="2 different prompts"):
        pseudo_preferences(bad, cert, check_hash=False)


def test_conversational_prompts_are_accepted_compared_structurally_and_kept(tmp_path):
    rows = _rows(conversational=True)
    path = _write(rows, tmp_path / "chat.parquet")
    plain = _write(_rows(), tmp_path / "plain.parquet")
    loaded, ref = load_scores(path, "r", SPECS), load_scores(plain, "r", SPECS)
    np.testing.assert_array_equal(np.asarray(loaded.scores.reward), np.asarray(ref.scores.reward))
    prefs, stats = pseudo_preferences(path, _cert(path), "soft", 2)
    table = prefs.table
    first = table.column("prompt")[0].as_py()
    assert isinstance(first, list) and first[0]["role"] == "user"
    chosen = table.column("chosen")[0].as_py()
    assert chosen == [{"role": "assistant", "content": chosen[0]["content"]}]  # TRL: conversational throughout
    # Two different conversations under one id are caught; the same conversation rebuilt is not a difference.
    rows[1]["prompt"] = [{"role": "user", "content": "question 0"}]  # same structure, rebuilt: fine
    load_scores(_write(rows, tmp_path / "same.parquet"), "r", SPECS)
    rows[2]["prompt"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "question 0"}]
    with pytest.raises(ScoresFormatError, match="2 different prompts"):
        load_scores(_write(rows, tmp_path / "two.parquet"), "r", SPECS)


@pytest.mark.parametrize(
    "prompt, why",
    [([], "empty"), ([{"role": "user", "content": "  "}], "empty"), ([{"role": "user"}], "content"),
     ([{"content": "hi"}], "role"), ([{"role": "user", "content": 3}], "content")],
)  # fmt: skip
def test_bad_conversations_give_one_clear_line(tmp_path, prompt, why):
    rows = _rows(n=4, conversational=True)
    rows[0]["prompt"] = prompt
    # Heterogeneous values cannot share an Arrow column: write JSON Lines, as a user would.
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ScoresFormatError, match=why) as err:
        load_scores(path, "r", SPECS)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- label validates the certificate
@pytest.mark.parametrize(
    "edit, match",
    [(lambda c: c.update(beta=5.0), "not the solution"), (lambda c: c.update(beta=-1.0), "beta"),
     (lambda c: c.update(beta=None), "beta"), (lambda c: c["constraints"][0].update({"lambda": -0.5}), "lambda"),
     (lambda c: c["lambda"].update(safe=c["lambda"]["safe"] + 1.0), "disagree"),
     (lambda c: c["constraints"][0].update(name="nope"), "nope"), (lambda c: c.update(constraints="x"), "constraints"),
     (lambda c: c["data"].update(reward=None), "reward"),
     (lambda c: [x.update({"lambda": 2 * x["lambda"]}) for x in [c["constraints"][0]]] and c["lambda"].update(
         safe=c["constraints"][0]["lambda"]), "not the solution")],
)  # fmt: skip
def test_label_validates_the_certificate(tmp_path, edit, match):
    path = _write(_rows(), tmp_path / "s.parquet")
    cert = _cert(path).to_dict()
    edit(cert)
    cert_path = tmp_path / "cert.json"
    cert_path.write_text(json.dumps(cert))
    with pytest.raises(CanError, match=match):
        pseudo_preferences(path, Certificate.read(cert_path))


def test_label_applies_the_dropped_rows_rule_of_the_certificate(tmp_path):
    rows = _rows()
    rows[3]["safe"] = float("nan")
    rows[9]["prompt"] = ""
    path = _write(rows, tmp_path / "s.parquet")
    with pytest.raises(ScoresFormatError, match="drop-bad-rows"):
        load_scores(path, "r", SPECS)
    cert = _cert(path, drop=True)
    assert cert.data["bad_rows"] == "dropped" and cert.data["dropped_rows"] == 2
    assert cert.drops_bad_rows
    prefs, _ = pseudo_preferences(path, cert, "soft", 3)
    table = prefs.table
    used = set(table.column("chosen").to_pylist()) | set(table.column("rejected").to_pylist())
    assert "a0-3" not in used and "a2-1" not in used


def test_pairs_per_prompt_never_repeats_a_pair(tmp_path):
    path = _write(_rows(), tmp_path / "s.parquet")  # K = 4: 6 distinct pairs per prompt
    prefs, stats = pseudo_preferences(path, _cert(path), "soft", pairs_per_prompt=8)
    table = prefs.table
    pairs = [(p, frozenset((c, r))) for p, c, r in zip(*(table.column(n).to_pylist()
                                                         for n in ("prompt_id", "chosen", "rejected")))]  # fmt: skip
    assert len(pairs) == len(set(pairs)) == 30 * 6
    assert stats.pairs_capped == 30


def test_lambda_from_the_certificate_matches_the_reference(tmp_path):
    rows = _rows()
    path = _write(rows, tmp_path / "s.parquet")
    cert = _cert(path)
    groups = []
    for i in range(30):
        sub = [r for r in rows if r["prompt_id"] == i]
        groups.append((np.array([r["r"] for r in sub]), np.array([[r["safe"]] for r in sub])))
    np.testing.assert_allclose(cert.lam["safe"], ref_solve_lbfgsb(groups, np.array([0.1]), 1.0), atol=1e-6)


# ---------------------------------------------------------------- reading: directories, binary files, sniffing
def test_a_directory_is_named_as_such(tmp_path):
    d = tmp_path / "scores.parquet"
    d.mkdir()
    with pytest.raises(ScoresFormatError, match="is a directory"):
        read_table(d)


def test_binary_bytes_never_reach_the_message(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ScoresFormatError) as err:
        read_table(path)
    msg = str(err.value)
    assert "binary" in msg and msg.isprintable() and len(msg) < 300


def test_parquet_is_recognised_whatever_the_suffix(tmp_path):
    path = _write(_rows(n=3), tmp_path / "scores.data")
    assert read_table(path).num_rows == 12
    fake = tmp_path / "fake.parquet"
    fake.write_text("prompt_id,r\n1,2\n")
    with pytest.raises(ScoresFormatError, match="not a Parquet file"):
        read_table(fake)


# ---------------------------------------------------------------- writing: umask and one-line errors
def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize("where", ["dir", "file-parent"])
def test_write_errors_are_one_line(tmp_path, where):
    cert = _cert(_write(_rows(n=5), tmp_path / "s.parquet"))
    if where == "dir":
        target = tmp_path / "out"
        target.mkdir()
    else:
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "cert.json"
    with pytest.raises(CanError, match="cannot write") as err:
        cert.write(target)
    assert "\n" not in str(err.value)
    # the path is described (issue 24), not the OS's "file exists" / "not a directory"
    said = str(err.value).split(": ", 1)[1]
    assert said == ("it is a folder" if where == "dir" else f"{tmp_path / 'f'} is a file, not a folder")
