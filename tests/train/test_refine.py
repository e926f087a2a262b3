"""`can refine` on a tiny chain (issue 21): a correction round moves the achieved gain toward the margin, rounds
link by hash, a killed run resumes, and a policy or certificate from another chain is refused.

Deterministic setup: the tiny LM of tests/train/conftest.py on CPU, trained by a one-shot MoCAN chain whose reward
is the toy `e` share and whose constraint is `brev` (−characters/20: shorter answers, which this model learns
monotonically in λ — it realises ~20% of the predicted brevity gain at λ = 0.57, 1, 1.5 and 2.5 alike), soft
labels, every seed fixed (the calibration sampling seed RefineConfig.seed, the label seed, DPO's seed): a round's λ,
labels and weights are the same numbers on every run of this machine's torch build (two processes measured the same
gain to the last digit). The `e` constraint of tests/train/conftest.py's chain is not monotone here: at λ 3, 6, 9,
11 and 20 this model gained +0.010, +0.015, +0.008, +0.007, +0.006 of it.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

CALIBRATION = [f"say something about topic {i}." for i in range(64)]
SCORERS = ["e=tests.train.toy_scorers:e_share", "brev=tests.train.toy_scorers:brevity"]


@pytest.fixture(scope="module")
def chain(tiny_lm, tmp_path_factory):
    """One-shot MoCAN on the tiny LM: reward e, constraint brev (margin half its reach), soft labels."""
    from dataclasses import replace

    from train.demo import DemoConfig, run_chain

    _, _, path = tiny_lm
    out = tmp_path_factory.mktemp("brev-chain")
    cfg = DemoConfig(policy=str(path), reward="e", scorers=list(SCORERS),
                     train_prompts=[f"tell me about item {i}." for i in range(24)],
                     eval_prompts=[f"what is thing {i}?" for i in range(16)], k=8, max_new_tokens=12, beta=0.1,
                     margin_frac=0.5, mode="soft", pairs_per_prompt=8,
                     dpo=replace(DemoConfig().dpo, epochs=3, lr=3e-3, batch_size=16), max_length=64)  # fmt: skip
    return cfg, out, run_chain(cfg, out, say=lambda *_: None)


def _config(chain, out, **kw):
    from train.chain import RefineConfig
    from train.settings import DPOSettings

    cfg, folder, _ = chain
    base = dict(policy=str(folder / "run" / "policy"), scores=str(folder / "scores.parquet"),
                prompts=list(CALIBRATION), scorers=list(SCORERS), out=str(out), reference=cfg.policy, rounds=1,
                k=8, max_new_tokens=cfg.max_new_tokens, seed=5, mode=cfg.mode, pairs_per_prompt=cfg.pairs_per_prompt,
                label_seed=0, dpo=DPOSettings(epochs=cfg.dpo.epochs, lr=cfg.dpo.lr, batch_size=cfg.dpo.batch_size,
                                              max_length=cfg.max_length, seed=0))  # fmt: skip
    return RefineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def one_round(chain, tmp_path_factory):
    from train.refine import refine

    out = tmp_path_factory.mktemp("refine")
    return out, refine(_config(chain, out, start="reference"), say=lambda *_: None)


def test_a_round_moves_the_gain_toward_the_margin(one_round, chain):
    out, report = one_round
    r0, r1 = report.rounds
    b = report.margins[0]
    a0, h0 = r0["gains"]["brev"]["calibration"], r0["gains"]["brev"]["calibration_half_width"]
    a1 = r1["gains"]["brev"]["calibration"]
    print(f"b {b:+.4f}; round 0: λ {r0['lambda']['brev']:.4g}, a {a0:+.4f} ± {h0:.4f}; round 1: λ "
          f"{r1['lambda']['brev']:.4g}, a {a1:+.4f}")  # fmt: skip
    assert a0 < b - h0  # one-shot falls short of the margin (the tiny model realises little of the tilt)
    assert r1["lambda"]["brev"] > r0["lambda"]["brev"]  # the step raises the price of the constraint that fell short
    assert abs(a1 - b) < abs(a0 - b) - h0  # and the next policy's gain is closer to b by more than the interval
    for name in ("rounds.md", "rounds.json", "rounds.png"):
        assert (out / name).exists()
    assert r1["gains"]["brev"]["insample"] is not None  # the on-training column


def test_continuing_from_the_previous_policy_keeps_pi_ref_as_the_dpo_reference(one_round, chain, tmp_path):
    """--start previous: round 1's DPO starts from round 0's policy, with the chain's π_ref as its reference (the run
    record says both); the step is the same as from π_ref (it depends on round 0 only)."""
    from train.refine import refine

    cfg, folder, _ = chain
    report = refine(_config(chain, tmp_path, start="previous", insample=False), say=lambda *_: None)
    record = json.loads((tmp_path / "round-1" / "run" / "run.json").read_text())
    assert record["policy"] == str(folder / "run" / "policy") and record["settings"]["reference"] == cfg.policy
    _, ref = one_round
    assert report.rounds[1]["lambda"] == ref.rounds[1]["lambda"]
    a = [r["gains"]["brev"]["calibration"] for r in report.rounds]
    print(f"continuing: round 0 {a[0]:+.4f}, round 1 {a[1]:+.4f}; from π_ref: round 1 "
          f"{ref.rounds[1]['gains']['brev']['calibration']:+.4f}")  # fmt: skip


def test_rounds_link_by_hash_and_the_round_certificate_solves_its_dual(one_round, chain):
    from bridge.certificate import Certificate
    from bridge.dual import check_solution

    out, report = one_round
    _, folder, _ = chain
    root = Certificate.read(folder / "certificate.json")
    cert = Certificate.read(out / "round-1" / "certificate.json")
    assert cert.round["index"] == 1 and cert.round["parent_sha256"] == root.sha256
    assert cert.round["root_sha256"] == root.sha256 and cert.target_margins == root.margins
    # The round's λ is the dual's solution on the original samples at its effective margins (what `label` checks).
    check_solution(folder / "scores.parquet", cert)
    assert report.rounds[1]["certificate_sha256"] == cert.sha256
    # The policy of round 1 carries its round certificate (`can train` wrote it beside the weights).
    assert Certificate.read(out / "round-1" / "run" / "policy" / "certificate.json").sha256 == cert.sha256


def _cli(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "train.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


def _cli_args(chain, out, prompts_file):
    cfg, folder, _ = chain
    return ["refine", str(folder / "run" / "policy"), "--scores", str(folder / "scores.parquet"), "--prompts",
            str(prompts_file), *sum((["-s", s] for s in SCORERS), []), "--reference", cfg.policy, "--out", str(out),
            "--rounds", "1", "--k", "8", "--max-new-tokens", str(cfg.max_new_tokens), "--seed", "5", "--mode",
            cfg.mode, "--pairs-per-prompt", str(cfg.pairs_per_prompt), "--epochs", str(cfg.dpo.epochs), "--lr",
            str(cfg.dpo.lr), "--batch-size", str(cfg.dpo.batch_size), "--max-length", str(cfg.max_length), "--dpo-seed",
            "0", "--no-insample", "--start", "reference"]  # fmt: skip


def test_a_killed_run_resumes_and_keeps_what_it_finished(one_round, chain, tmp_path):
    """kill -9 once round 1's certificate is written (its DPO under way), run the same command again: it resumes,
    leaves the finished files as they were, and ends where the uninterrupted run ended."""
    prompts = tmp_path / "calibration.txt"
    prompts.write_text("\n".join(CALIBRATION) + "\n")
    out = tmp_path / "rounds"
    args = _cli_args(chain, out, prompts)
    proc = _cli(args)
    cert = out / "round-1" / "certificate.json"
    deadline = time.time() + 600
    while not cert.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "round-1" / "run" / "policy" / "certificate.json").exists()  # killed before round 1 finished
    kept = {p: p.stat().st_mtime_ns for p in [cert, out / "round-0" / "calibration" / "evaluation.json"]}
    again = _cli(args)
    text, _ = again.communicate(timeout=900)
    assert again.returncode == 0, text
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    done = json.loads((out / "rounds.json").read_text())
    ref_out, ref = one_round
    got = [r["gains"]["brev"]["calibration"] for r in done["rounds"]]
    want = [r["gains"]["brev"]["calibration"] for r in ref.rounds]
    np.testing.assert_allclose(got, want, atol=1e-9)  # the same rounds as the uninterrupted in-process run
    assert json.loads(cert.read_text())["lambda"] == json.loads(
        (ref_out / "round-1" / "certificate.json").read_text())["lambda"]  # fmt: skip


def test_refine_refuses_another_chain(chain, tmp_path):
    """A policy aligned under another certificate, a scores table that is not the certificate's, an OUT holding
    another chain's rounds: one `error:` line each, before any model work."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from train.cli import app

    cfg, folder, _ = chain
    prompts = tmp_path / "calibration.txt"
    prompts.write_text("\n".join(CALIBRATION) + "\n")
    runner = CliRunner()

    def run(args):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, res.output
        return res.output

    base = _cli_args(chain, tmp_path / "r", prompts)
    # Another certificate: the dual at another margin.
    other = tmp_path / "other.json"
    res = runner.invoke(app, ["dual", str(folder / "scores.parquet"), "--reward", "e", "--beta", str(cfg.beta),
                              "--constraint", "brev=0.01", "--out", str(other)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "aligned under another certificate" in run([*base, "--certificate", str(other)])
    # Another scores table: one value changed.
    table = pq.read_table(folder / "scores.parquet")
    changed = table.set_column(table.column_names.index("e"), "e", [np.asarray(table.column("e")) + 1e-3])
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), tmp_path / "changed.parquet")
    args = list(base)
    args[args.index("--scores") + 1] = str(tmp_path / "changed.parquet")
    assert "is not the scores table the certificate" in run(args)
    # Another reference than the policy was aligned from.
    args = list(base)
    args[args.index("--reference") + 1] = str(tmp_path)
    assert "was aligned from" in run(args)
    # The calibration file given as the test prompts too: refused before any model work.
    assert "are also test prompts" in run([*base, "--test-prompts", str(prompts)])
    assert not (tmp_path / "r").exists()
    # An OUT holding another chain's rounds.
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "refine.json").write_text(json.dumps({"root_sha256": "0" * 64, "policy": "x"}))
    assert "another chain" in run(base)
    assert not list(Path(tmp_path / "r").glob("round-*"))
    # This chain's rounds made with the secant step, continued with --no-secant: its steps would differ.
    from bridge.certificate import read_beside
    from train.chain import RefineConfig

    rec = {
        "root_sha256": read_beside(folder / "run" / "policy").sha256,
        "policy": str(folder / "run" / "policy"),
        "settings": {**RefineConfig(policy="", scores="", prompts=[], scorers=[], start="reference").chain_settings(),
                     "calibration_prompts_sha256": _sha(CALIBRATION), "test_prompts_sha256": None},
    }
    (tmp_path / "r" / "refine.json").write_text(json.dumps(rec, default=str))
    assert "secant False here, True there" in run([*base, "--no-secant"])
    assert not list(Path(tmp_path / "r").glob("round-*"))


def _sha(prompts) -> str:
    """A text prompt list's SHA-256 as refine records it (its JSON), computed here by hand."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def test_a_rerun_on_other_prompts_is_refused(one_round, chain, tmp_path):
    """The finished run's record, resumed with one calibration prompt dropped: refused, both prompt sets named by
    hash; the same record without the hashes (a run from before they were kept): refused, saying why."""
    from can_jax.errors import CanError
    from train.refine import refine

    done, _ = one_round
    record = json.loads((done / "refine.json").read_text())
    assert record["settings"]["calibration_prompts_sha256"] == _sha(CALIBRATION)
    out = tmp_path / "r"
    out.mkdir()
    (out / "refine.json").write_text(json.dumps(record))
    with pytest.raises(CanError) as err:
        refine(_config(chain, out, start="reference", prompts=CALIBRATION[:-1]), say=lambda *_: None)
    said = str(err.value)
    assert f"(other calibration prompts (sha256 {_sha(CALIBRATION[:-1])[:12]} here, {_sha(CALIBRATION)[:12]} there))" \
        in said, said
    del record["settings"]["calibration_prompts_sha256"]
    (out / "refine.json").write_text(json.dumps(record))
    with pytest.raises(CanError, match="recorded before refine kept its prompts' hashes"):
        refine(_config(chain, out, start="reference"), say=lambda *_: None)
    # The same policy spelled with a trailing slash is the same chain (refused here only for the missing hashes).
    with pytest.raises(CanError, match="recorded before refine kept its prompts' hashes"):
        refine(_config(chain, out, start="reference", policy=record["policy"] + "/"), say=lambda *_: None)
    (out / "refine.json").write_text("[1]")  # JSON, but not a record
    with pytest.raises(CanError, match="not a refine record"):
        refine(_config(chain, out, start="reference"), say=lambda *_: None)
    assert not list(out.glob("round-*"))


def test_demo_refine_reuses_the_demo_evaluation_as_round_0(mocan_run):
    """`can demo --refine N` (train.demo.run_refine) on the tiny stand-in of the demo's chain: round 0's held-out row
    is the demo's own evaluation, every round is measured on the test prompts, calibration is the 96 calibration prompts
    (the selection set and 48 more)."""
    from train.demo import run_refine
    from train.demo_prompts import CALIBRATION_PROMPTS

    cfg, out, evaluation = mocan_run
    report = run_refine(cfg, out, 1, say=lambda *_: None)  # the default: DPO continuing from the previous policy
    folder = Path(report.out)
    assert folder == out / "refine"
    r0, r1 = report.rounds
    assert r0["gains"]["e"]["held_out"] == evaluation.row("e").achieved_gain
    assert r0["gains"]["e"]["insample"] == evaluation.row("e").insample_gain
    assert r1["gains"]["e"]["held_out"] is not None and r1["reward"]["held_out"] is not None
    cal = json.loads((folder / "round-1" / "calibration" / "evaluation.json").read_text())
    assert cal["prompts"] == len(CALIBRATION_PROMPTS) == 96
    assert "| 1 | e |" in (folder / "rounds.md").read_text()


def test_refine_under_accelerate_with_two_processes(one_round, chain, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m train.cli refine …` (2 CPU processes over gloo): the
    calibration measurement is the one-process one (sampling units carry their seeds), so the step is the same;
    DPO runs as DDP (--batch-size 8 per process: the one-process run's 16 pairs per step)."""
    root = Path(__file__).resolve().parents[2]
    prompts = tmp_path / "calibration.txt"
    prompts.write_text("\n".join(CALIBRATION) + "\n")
    out = tmp_path / "rounds"
    args = _cli_args(chain, out, prompts)
    args[args.index("--batch-size") + 1] = "8"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train.cli", *args]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done = json.loads((out / "rounds.json").read_text())
    _, ref = one_round
    assert done["rounds"][0]["gains"]["brev"]["calibration"] == ref.rounds[0]["gains"]["brev"]["calibration"]
    assert done["rounds"][1]["lambda"] == pytest.approx(ref.rounds[1]["lambda"], abs=1e-12)
    assert (out / "round-1" / "run" / "policy" / "certificate.json").exists()
    assert res.stdout.count("round 1: λ") == 1  # one process speaks


def test_the_default_start_continues_except_with_lora():
    """No --start: DPO continues from the previous round's policy; with LoRA (whose DPO reference is its base model)
    it restarts from π_ref, and an explicit --start previous with LoRA is refused in one line."""
    from can_jax.errors import CanError
    from train.chain import RefineConfig
    from train.settings import DPOSettings

    base = dict(policy="p", scores="s.parquet", prompts=["a?", "b?"], scorers=["x=builtin:politeness"])
    assert RefineConfig(**base).start == "previous"
    assert RefineConfig(**base, dpo=DPOSettings(lora=True)).start == "reference"
    assert RefineConfig(**base, start="reference").chain_settings()["start"] == "reference"
    with pytest.raises(CanError, match="LoRA"):
        RefineConfig(**base, dpo=DPOSettings(lora=True), start="previous").check()


def test_refine_keeps_calibration_test_and_training_prompts_apart(tmp_path):
    """Calibration prompts that repeat, are test prompts or are training prompts of the scores table (as texts or as
    conversations, up to whitespace), and test prompts that are training prompts: refused in one line each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from can_jax.errors import CanError
    from train.prompts import check_prompts_apart

    scores = tmp_path / "scores.parquet"
    train = ["Bake bread.", "Fix a tyre.", "Plant tomatoes."]
    pq.write_table(pa.table({"prompt_id": np.repeat(np.arange(3), 4), "instruction": np.repeat(train, 4).tolist()}),
                   scores)  # fmt: skip
    fresh, test = ["Explain tides.", "Name a goldfish."], ["Unclog a sink.", "Pick avocados."]

    def refused(prompts, test_prompts=None):
        with pytest.raises(CanError) as err:
            check_prompts_apart(prompts, test_prompts, pq.read_table(scores))
        return str(err.value)

    check_prompts_apart(fresh, test, pq.read_table(scores))
    assert "1 calibration prompt(s) repeat" in refused([*fresh, "Explain  tides. "], test)
    assert "2 calibration prompt(s) are also test prompts" in refused([*fresh, *test], test)
    conv = [{"role": "user", "content": "Fix a  tyre."}]  # text is a one-turn user conversation
    assert "1 calibration prompt(s) are training prompts" in refused([*fresh, conv], test)
    system = [{"role": "system", "content": "Be brief."}, *conv]  # another system prompt: another prompt
    check_prompts_apart([*fresh, system, conv[0:1] * 2], test, pq.read_table(scores))
    # A table whose prompts are conversations (an `instruction` column of messages) and one with only `prompt`.
    chat = [[{"role": "user", "content": t}] for t in train]
    pq.write_table(pa.table({"prompt_id": np.arange(3), "instruction": chat}), scores)
    assert "1 test prompt(s) are training prompts" in refused(fresh, [*test, "Bake bread."])
    pq.write_table(pa.table({"prompt_id": np.arange(3), "prompt": train}), scores)
    assert "1 calibration prompt(s) are training prompts" in refused(["Bake  bread.", *fresh], test)
    assert "1 test prompt(s) are training prompts" in refused(fresh, [*test, "Plant tomatoes."])
    assert "1 test prompt(s) repeat" in refused(fresh, [*test, test[0]])


def test_a_refine_run_opens_its_scores_table_once(chain, tmp_path, monkeypatch):
    """Whatever the number of rounds, one refine run opens the scores file once (hashing included): the prompts
    check, the in-sample gains, the Hessian, each round's certificate and labels take the table from memory."""
    import builtins
    import io

    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    from train.refine import refine

    scores = (chain[1] / "scores.parquet").resolve()
    opened = []

    def counting(fn):
        def wrapper(source, *args, **kwargs):
            try:
                if isinstance(source, (str, os.PathLike)) and Path(os.fspath(source)).resolve() == scores:
                    opened.append(fn.__name__)
            except (OSError, ValueError):
                pass
            return fn(source, *args, **kwargs)

        return wrapper

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", counting(real_open))
    monkeypatch.setattr(io, "open", counting(real_open))
    for mod, name in [(pyarrow.parquet, "ParquetFile"), (pyarrow.parquet, "read_table"), (pyarrow.parquet,
                      "read_schema"), (pyarrow.json, "read_json"), (pyarrow.csv, "read_csv")]:  # fmt: skip
        monkeypatch.setattr(mod, name, counting(getattr(mod, name)))
    report = refine(_config(chain, tmp_path, rounds=2, start="reference"), say=lambda *_: None)
    assert len(report.rounds) == 3  # two correction rounds: two certificates, two labellings, three measurements
    assert opened == ["open"], opened
