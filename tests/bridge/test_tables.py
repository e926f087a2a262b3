import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from bridge.certificate import Certificate
from bridge.files import atomic_write_text, sha256_file
from bridge.tables import ConstraintSpec, load_scores, parse_constraint
from can_jax.errors import CanError, DegenerateDataError, ScoresFormatError


def _table(n=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for _ in range(k - (i % 2)):  # ragged: 3, 2, 3, 2, ...
            rows.append({"prompt_id": f"p{i}", "prompt": f"question {i}", "r": rng.normal(), "safe": rng.normal(),
                         "harm": rng.normal()})  # fmt: skip
    return pa.Table.from_pylist(rows)


def _write(table, path):
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pcsv.write_csv(table, path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in table.to_pylist()) + "\n")
    return path


SPECS = [ConstraintSpec("safe", 0.1), ConstraintSpec("harm", 0.2, "cost")]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_formats_load_to_the_same_padded_arrays(tmp_path, suffix):
    t = _table()
    ref = load_scores(_write(t, tmp_path / "s.parquet"), "r", SPECS)
    got = load_scores(_write(t, tmp_path / f"x{suffix}"), "r", SPECS)
    np.testing.assert_allclose(got.scores.reward, ref.scores.reward, rtol=1e-15)
    np.testing.assert_allclose(got.scores.utility, ref.scores.utility, rtol=1e-15)
    np.testing.assert_array_equal(got.scores.mask, ref.scores.mask)


def test_padding_mask_and_cost_negation(tmp_path):
    t = _table()
    got = load_scores(_write(t, tmp_path / "s.parquet"), "r", SPECS)
    assert got.scores.reward.shape == (5, 3)
    np.testing.assert_array_equal(np.asarray(got.scores.mask).sum(axis=1), [3, 2, 3, 2, 3])
    rows = t.to_pylist()
    first = [row for row in rows if row["prompt_id"] == "p1"]
    i = list(got.prompt_ids).index("p1")
    np.testing.assert_allclose(got.scores.reward[i, :2], [row["r"] for row in first])
    np.testing.assert_allclose(got.scores.utility[i, :2, 1], [-row["harm"] for row in first])  # cost negated
    assert got.kinds == ["utility", "cost"] and list(got.margins) == [0.1, 0.2]
    assert got.sha256 == sha256_file(tmp_path / "s.parquet")


def test_missing_column_names_it(tmp_path):
    p = _write(_table(), tmp_path / "s.parquet")
    with pytest.raises(ScoresFormatError, match=r"missing column\(s\) \['nope'\]"):
        load_scores(p, "r", [ConstraintSpec("nope", 0.1)])


def test_nan_rows_are_named_or_dropped(tmp_path):
    t = _table().to_pylist()
    t[4]["safe"] = float("nan")
    t[7]["r"] = float("inf")
    p = _write(pa.Table.from_pylist(t), tmp_path / "s.parquet")
    with pytest.raises(ScoresFormatError, match=r"rows 4, 7"):
        load_scores(p, "r", SPECS)
    got = load_scores(p, "r", SPECS, drop_bad_rows=True)
    assert got.dropped_rows == 2 and int(np.asarray(got.scores.mask).sum()) == len(t) - 2


def test_empty_prompt_and_null_id_are_bad_rows(tmp_path):
    t = _table().to_pylist()
    t[0]["prompt"] = "  "
    t[2]["prompt_id"] = None
    with pytest.raises(ScoresFormatError, match=r"rows 0, 2"):
        load_scores(_write(pa.Table.from_pylist(t), tmp_path / "s.parquet"), "r", SPECS)


def test_one_response_per_prompt_is_degenerate(tmp_path):
    p = _write(_table(k=1), tmp_path / "s.parquet")
    with pytest.raises(DegenerateDataError, match="fewer than two responses"):
        load_scores(p, "r", SPECS)


def test_bad_files_and_specs(tmp_path):
    with pytest.raises(ScoresFormatError, match="not found"):
        load_scores(tmp_path / "none.parquet", "r", SPECS)
    (tmp_path / "s.txt").write_text("x")
    with pytest.raises(ScoresFormatError, match="suffix"):
        load_scores(tmp_path / "s.txt", "r", SPECS)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ScoresFormatError, match="not a Parquet file"):
        load_scores(tmp_path / "bad.parquet", "r", SPECS)
    for text in ["safe", "safe=abc", "=1", "safe=nan"]:
        with pytest.raises(ScoresFormatError):
            parse_constraint(text)
    assert parse_constraint("a=b=0.5") == ConstraintSpec("a=b", 0.5)


def test_atomic_write_and_certificate_checks(tmp_path):
    p = tmp_path / "c.json"
    atomic_write_text(p, "{}")
    assert p.read_text() == "{}" and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(CanError, match="not a can dual certificate"):
        Certificate.read(p)
    p.write_text(json.dumps({"format": "can.dual-certificate", "format_version": 1, "converged": False,
                             "message": "x"}))  # fmt: skip
    with pytest.raises(CanError, match="did not converge"):
        Certificate.read(p)
    with pytest.raises(CanError, match="beta"):  # a skeleton is still not a certificate (issue #13)
        Certificate.read(p, require_converged=False)


def test_diagnostics_flag_unreliable_certificates():
    from bridge.certificate import diagnose

    cert = {
        "constraints": [{"name": "flat", "reach": 0.0, "active": False}, {"name": "ok", "reach": 1.0, "active": True}],
        "data": {"prompts_with_one_response": 3},
        "predicted": {"ess_fraction": 0.01},
        "hessian_condition": None,
    }
    notes = " | ".join(diagnose(cert))
    assert "'flat' does not vary" in notes and "3 prompt(s)" in notes and "few samples" in notes
    assert "ill-conditioned" in notes
    cert.update(data={}, predicted={"ess_fraction": 0.5}, hessian_condition=3.0)
    cert["constraints"] = cert["constraints"][1:]
    assert diagnose(cert) == []


def test_missing_column_lists_every_column_of_the_file(tmp_path):
    # The table is read with the needed columns only; the message still lists all the file has.
    p = _write(_table(), tmp_path / "s.parquet")
    with pytest.raises(ScoresFormatError, match=r"the table has \['prompt_id', 'prompt', 'r', 'safe', 'harm'\]"):
        load_scores(p, "r", [ConstraintSpec("nope", 0.1)])


@pytest.mark.parametrize("ids", [[3, 3, 5, 5, 5, 9], [0, 1, 1, 2], [7, 7, 2, 2, 7], [-4, -4, 1, 1]])
def test_group_prompts_sorted_path_equals_first_appearance_numbering(ids):
    from bridge.tables import group_prompts

    # Reference: number ids by first appearance, written out by hand.
    seen = {}
    want = np.array([seen.setdefault(i, len(seen)) for i in ids])
    for chunks in ([ids], [ids[:1], ids[1:3], ids[3:]]):
        col = pa.chunked_array([pa.array(c, pa.int64()) for c in chunks if c])
        index, uniq = group_prompts(col)
        np.testing.assert_array_equal(index, want)
        np.testing.assert_array_equal(uniq, list(seen))


def test_numeric_values_reads_chunks_slices_and_nulls():
    from bridge.tables import numeric_values

    base = pa.array(np.arange(10, dtype=np.float32))
    col = pa.chunked_array([base.slice(3, 4), pa.array([], pa.float32()), base.slice(8, 2)])
    got = numeric_values(col)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [3, 4, 5, 6, 8, 9])
    np.testing.assert_array_equal(numeric_values(pa.chunked_array([pa.array([5, 1], pa.uint16())])), [5, 1])
    nulls = numeric_values(pa.chunked_array([pa.array([1.0, None, 2.0])]))
    np.testing.assert_array_equal(np.isnan(nulls), [False, True, False])


def test_load_scores_reads_a_sorted_integer_id_table_as_a_dictionary_encoding_does(tmp_path):
    # Integer ids grouped in order take the vectorised path; string ids of the same rows the hash path.
    rng = np.random.default_rng(1)
    counts = [3, 2, 4, 3]
    ids = np.repeat(np.array([10, 11, 15, 20]), counts)
    cols = {"r": rng.normal(size=ids.size), "safe": rng.normal(size=ids.size), "harm": rng.normal(size=ids.size)}
    a = load_scores(_write(pa.table({"prompt_id": ids, **cols}), tmp_path / "a.parquet"), "r", SPECS)
    b = load_scores(_write(pa.table({"prompt_id": [f"p{i}" for i in ids], **cols}), tmp_path / "b.parquet"), "r",
                    SPECS)  # fmt: skip
    for x, y in zip(a.scores, b.scores, strict=True):
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(a.prompt_ids, [10, 11, 15, 20])
    assert a.sha256 == sha256_file(tmp_path / "a.parquet")
