"""The evaluation report, the refine record and the rounds report: files written before they had a format (today's
fixtures in tests/data/before_stages/) read as version 0; a written report carries its format and version and
reads back equal; another format or a newer version is refused in one line."""

import json
from pathlib import Path

import pytest

from bridge.reports import EvaluationReport, GainRow, RefineRecord, RoundsReport
from can_jax.errors import CanError

BEFORE = Path(__file__).resolve().parents[1] / "data" / "before_stages"
KINDS = [(EvaluationReport, "evaluation.json", "can.evaluation"), (RefineRecord, "refine.json", "can.refine-record"),
         (RoundsReport, "rounds.json", "can.rounds")]  # fmt: skip


@pytest.mark.parametrize("cls, name, fmt", KINDS)
def test_files_from_before_the_versions_read_and_round_trip(cls, name, fmt, tmp_path):
    old = json.loads((BEFORE / name).read_text())
    report = cls.read(BEFORE / name)
    assert report.format_version == 0
    report.write(tmp_path / name)
    written = json.loads((tmp_path / name).read_text())
    assert written["format"] == fmt and written["format_version"] == cls.VERSION
    assert {k: v for k, v in written.items() if k not in ("format", "format_version")} == old
    again = cls.read(tmp_path / name)
    assert again.format_version == cls.VERSION and again.to_dict() == written


@pytest.mark.parametrize("cls, name, fmt", KINDS)
def test_another_format_or_a_newer_version_is_refused(cls, name, fmt, tmp_path):
    body = json.loads((BEFORE / name).read_text())
    for change, says in [({"format": fmt, "format_version": cls.VERSION + 1}, "not supported"),
                         ({"format": "can.something-else"}, "not a"), ({"format": fmt, "format_version": "2"},
                                                                       "not supported")]:  # fmt: skip
        path = tmp_path / name
        path.write_text(json.dumps({**body, **change}))
        with pytest.raises(CanError, match=says) as err:
            cls.read(path)
        assert "\n" not in str(err.value)
    path.write_text("[1, 2]")
    with pytest.raises(CanError, match="JSON object"):
        cls.read(path)
    with pytest.raises(CanError, match="not found"):
        cls.read(tmp_path / "missing.json")


def test_evaluation_rows_are_typed():
    report = EvaluationReport.read(BEFORE / "evaluation.json")
    raw = json.loads((BEFORE / "evaluation.json").read_text())
    assert report.names == [r["name"] for r in raw["rows"]]
    for row, r in zip(report.rows, raw["rows"]):
        assert isinstance(row, GainRow) and row.as_dict() == r
        assert report.row(row.name) is row and row.ci95 == tuple(r["ci95"])
    assert report.prompts == raw["prompts"] and report.lam == raw["lambda"] and report.beta == raw["beta"]
    with pytest.raises(CanError, match="no row 'nope'"):
        report.row("nope")
    assert report.with_seconds({"evaluate": 1.5}).seconds == {"evaluate": 1.5} and report.seconds is None


def test_rounds_and_record_properties():
    rounds = RoundsReport.read(BEFORE / "rounds.json")
    raw = json.loads((BEFORE / "rounds.json").read_text())
    assert rounds.names == raw["names"] and rounds.margins == raw["margins"] and rounds.stopped is raw["stopped"]
    assert [r["round"] for r in rounds.rounds] == [0, 1, 2]
    record = RefineRecord.read(BEFORE / "refine.json")
    assert record.settings["step"] == "newton" and len(record.root_sha256) == 64
