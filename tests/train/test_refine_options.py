"""User mistakes in `can refine` / `can demo --refine` options that must be refused before any model work: the
rounds' label and DPO options (else found after round 0's minutes of measuring, with refine.json already holding
them), a scorer spec other than the certificate's, prompts in a JSON file read as text, and the demo's round options
or a file as --out (else found after the ~14-minute chain, or a traceback)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from can_jax.errors import CanError


def _cfg(**kw):
    from train.chain import RefineConfig

    return RefineConfig(**{"policy": "", "scores": "", "prompts": ["a?", "b?"], "scorers": [], **kw})


@pytest.mark.parametrize(
    ("kw", "said"),
    [
        ({"mode": "foo"}, "unknown labelling mode 'foo'"),
        ({"pairs_per_prompt": 0}, "--pairs-per-prompt must be at least 1"),
        ({"dpo": {"lr": -1.0}}, "--lr must be a positive number, got -1.0"),
        ({"dpo": {"epochs": 0}}, "--epochs must be a positive number, got 0"),
        ({"dpo": {"batch_size": 0}}, "--batch-size must be at least 1, got 0"),
        ({"dpo": {"max_length": 0}}, "--max-length must be at least 1, got 0"),
        ({"dpo": {"train_top": 0}}, "--train-top must be at least 1, got 0"),
        ({"dpo": {"precision": "fp8"}}, "--precision 'fp8'"),
        ({"test_k": 0}, "--test-k must be at least 1"),
        ({"gen_batch_size": 0}, "--gen-batch-size must be at least 1"),
        ({"test_prompts": ["only one?"]}, "1 test prompt(s): give at least 2"),
    ],
)
def test_round_options_are_checked_before_round_0(kw, said):
    from train.settings import DPOSettings

    _cfg().check()  # the defaults pass
    with pytest.raises(CanError, match=None) as err:  # the DPO options are checked as they are made
        _cfg(**{k: DPOSettings(**v) if k == "dpo" else v for k, v in kw.items()}).check()
    assert said in str(err.value)


def test_a_scorer_spec_other_than_the_certificates_is_refused(tmp_path):
    from train.scorers import check_scorer_specs

    class Cert:  # what check_scorer_specs reads of a Certificate: its recorded scorers
        scorers = {"help": {"spec": "builtin:helpfulness"}, "harm": {"spec": "builtin:harmlessness"}}

    check_scorer_specs(Cert, [("help", "builtin:helpfulness"), ("harm", "builtin:harmlessness")])
    with pytest.raises(CanError, match="the certificate's 'harm' was scored with 'builtin:harmlessness'"):
        check_scorer_specs(Cert, [("help", "builtin:helpfulness"), ("harm", "builtin:politeness")])
    model = tmp_path / "cost"
    model.mkdir()
    Cert.scorers = {"harm": {"spec": str(model)}}
    check_scorer_specs(Cert, [("harm", str(model) + "/")])  # the same folder, spelled otherwise
    Cert.scorers = {}
    check_scorer_specs(Cert, [("harm", "anything")])  # a certificate without the block is not checked


def test_prompts_in_json_files_are_not_read_as_text(tmp_path):
    from train.prompts import read_prompts

    lines = "".join(json.dumps({"prompt": p}) + "\n" for p in ["a?", "b?"])
    for name in ("p.JSONL", "p.jsonl"):
        (tmp_path / name).write_text(lines)
        assert read_prompts(tmp_path / name) == ["a?", "b?"]
    (tmp_path / "p.json").write_text(lines)
    with pytest.raises(CanError, match="give prompts as .jsonl"):
        read_prompts(tmp_path / "p.json")
    (tmp_path / "p.txt").write_text(lines)
    with pytest.raises(CanError, match="name the file .jsonl"):
        read_prompts(tmp_path / "p.txt")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--refine", "1", "--step", "foo"], "--step 'foo'"),
        (["--refine", "1", "--step", "caid", "--eta", "0"], "--eta must be a positive number"),
        (["--refine", "1", "--start", "foo"], "--start 'foo'"),
        ([], "is a file"),
    ],
)
def test_demo_refuses_bad_round_options_and_a_file_as_out_at_once(tmp_path, args, said):
    from train.cli import app

    out = tmp_path / ("file.txt" if not args else "run")
    if not args:
        out.write_text("x")
    res = CliRunner().invoke(app, ["demo", "--out", str(out), *args])
    assert res.exit_code == 1, res.output
    assert said in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_record_from_before_test_k_and_the_demos_dpo_dict_still_resumes(tmp_path):
    """A refine.json written before test_k/test_seed were recorded (then K = k and seed 2), with the DPO options as the
    demo wrote them (lora False and precision unset recorded or not), resumes; a changed test K is refused."""
    from types import SimpleNamespace

    from bridge.reports import RefineRecord
    from train.chain import RECORD, check_record
    from train.settings import DPOSettings

    cert = SimpleNamespace(sha256="c" * 64, scores_sha256="s" * 64)
    cfg = _cfg(k=4, dpo=DPOSettings(epochs=1.0, lr=1e-4, train_top=8, batch_size=8, max_length=192, seed=0))
    check_record(tmp_path, cfg, cert)  # writes the record as today's code does
    old = json.loads((tmp_path / RECORD).read_text())
    for key in ("test_k", "test_seed"):
        del old["settings"][key]
    old["settings"]["dpo"] = {"epochs": 1.0, "lr": 1e-4, "batch_size": 8, "max_length": 192, "lora": False,
                              "train_top": 8, "seed": 0}  # fmt: skip
    (tmp_path / RECORD).write_text(json.dumps(old))
    RefineRecord.read(tmp_path / RECORD)
    check_record(tmp_path, cfg, cert)  # resumes
    with pytest.raises(CanError, match="test_k 8 here, 4 there"):
        check_record(tmp_path, _cfg(k=4, test_k=8, dpo=cfg.dpo), cert)
