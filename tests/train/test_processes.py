"""Every stage across processes with accelerate (issue 11): the CLI as one package, DPO options, and real
2-process (gloo, CPU) runs of collect, train and evaluate compared with one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from can_jax.errors import CanError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"tell me about item {i}." for i in range(12)]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _can(*args, procs: int | None = None, timeout=600, check=True, env: dict | None = None):
    """`python -m train.cli ARGS`, with `--num-processes PROCS` when given (on this CPU machine: PROCS processes
    over gloo, launched by the command itself through accelerate's launcher); `env`: variables to set (None: unset)."""
    cmd = [sys.executable, "-m", "train.cli", *map(str, args)]
    if procs is not None:
        cmd += ["--num-processes", str(procs)]
    full = _env()
    for k, v in (env or {}).items():
        full.pop(k, None) if v is None else full.update({k: v})
    res = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_cli_is_one_package_run_every_way():
    for res in (_can("--help"), _can("train", "--help"), _can("collect", "--help")):
        assert "Usage" in res.stdout
    listing = _can("--help").stdout
    for cmd in ("collect", "logratios", "dual", "sweep", "label", "train", "prealign", "evaluate", "demo"):
        assert cmd in listing
    exe = Path(sys.executable).with_name("can")
    if exe.exists():
        assert "train" in subprocess.run([exe, "--help"], capture_output=True, text=True, env=_env()).stdout
    res = _can("train", "--help")
    assert "DPOConfig" in res.stdout and "--num-processes" in res.stdout and "--accelerate-config" in res.stdout


def test_dpo_options_from_file_and_command_line(tmp_path):
    from train.dpo import make_config

    f = tmp_path / "dpo.yaml"
    f.write_text("gradient_accumulation_steps: 4\nlr_scheduler_type: cosine\nwarmup_steps: 10\nlearning_rate: 1e-3\n")
    cfg = make_config(tmp_path, 0.5, "fp32", f, ["--warmup_steps", "20", "--report_to", "none"], learning_rate=2e-5)
    assert cfg.gradient_accumulation_steps == 4 and cfg.lr_scheduler_type == "cosine"
    assert cfg.warmup_steps == 20  # the command line wins over the file
    assert cfg.learning_rate == 2e-5  # explicit options win over both
    assert cfg.beta == 0.5 and cfg.loss_type == ["sigmoid"] and cfg.precompute_ref_log_probs
    for args, name in [(["--loss_type", "ipo"], "loss_type"), (["--label_smoothing", "0.1"], "label_smoothing"),
                       (["--sync_ref_model", "true"], "sync_ref_model"), (["--use_weighting", "true"], "use_weighting"),
                       (["--f_divergence_type", "js_divergence"], "f_divergence_type"), (["--ld_alpha", "0.5"],
                       "ld_alpha"), (["--no_such_option", "1"], "unknown")]:  # fmt: skip
        with pytest.raises(CanError, match=name):
            make_config(tmp_path, 0.5, "fp32", None, args)
    f.write_text("label_smoothing: 0.2\n")
    with pytest.raises(CanError, match="label_smoothing"):
        make_config(tmp_path, 0.5, "fp32", f)
    with pytest.raises(CanError, match="not found"):
        make_config(tmp_path, 0.5, "fp32", tmp_path / "none.yaml")


def test_lora_default_learning_rate_and_checkpointing_names(tmp_path):
    """Issue 24: with --lora and no learning rate given, 10× the full-fine-tuning default (an adapter at 5e-6 left
    the policy unmoved); one given anywhere wins. Gradient checkpointing under either name, without transformers'
    deprecation warning."""
    import warnings

    from train.dpo import make_config
    from train.dpo_config import LEARNING_RATE, LORA_LEARNING_RATE

    assert LORA_LEARNING_RATE == 10 * LEARNING_RATE
    assert make_config(tmp_path, 0.5, "fp32").learning_rate == LEARNING_RATE
    assert make_config(tmp_path, 0.5, "fp32", lora=True).learning_rate == LORA_LEARNING_RATE
    assert make_config(tmp_path, 0.5, "fp32", lora=True, learning_rate=1e-6).learning_rate == 1e-6
    assert make_config(tmp_path, 0.5, "fp32", None, ["--learning_rate", "2e-6"], lora=True).learning_rate == 2e-6
    f = tmp_path / "dpo.yaml"
    f.write_text("learning_rate: 3e-6\ngradient_checkpointing: true\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cfg = make_config(tmp_path, 0.5, "fp32", f, lora=True)
        assert cfg.learning_rate == 3e-6 and cfg.gradient_checkpointing
        assert getattr(cfg, "activation_checkpointing", True)
        cfg = make_config(tmp_path, 0.5, "fp32")
        assert cfg.gradient_checkpointing == torch.cuda.is_available()


def _prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _shard_writers(out: Path) -> dict[int, int]:
    shards = sorted(out.with_name(out.name + ".shards").glob("shard-*.parquet"))
    return {int(p.stem.split("-")[1]): json.loads(pq.read_schema(p).metadata[b"can.shard"])["rank"] for p in shards}


def test_two_processes_collect_train_evaluate_like_one(tiny_lm, tmp_path):
    from train.collect import CollectConfig, collect

    _, _, path = tiny_lm
    prompts = _prompts(tmp_path)
    scorers = ["-s", "len=tests.train.toy_scorers:length", "-s", "e=tests.train.toy_scorers:e_share"]
    common = [prompts, "--policy", path, "--k", 4, "--max-new-tokens", 6, "--shard-size", 2, *scorers]
    # ① collect: one process (in this process) and two (accelerate, gloo) write the same table.
    one = collect(CollectConfig(prompts=str(prompts), policy=str(path), k=4, max_new_tokens=6, shard_size=2,
                                scorers=[scorers[1], scorers[3]]), tmp_path / "one.parquet")  # fmt: skip
    two = tmp_path / "two.parquet"
    _can("collect", *common, "-o", two, procs=2)
    t1, t2 = pq.read_table(one), pq.read_table(two)
    # The same samples, scores and metadata; log π_ref to float32 rounding (each of the two processes runs its
    # matrix products on one thread, this one on two: sums split differently, last bits differ).
    assert t2.drop_columns(["logp_ref"]).equals(t1.drop_columns(["logp_ref"]))
    assert t2.schema.metadata == t1.schema.metadata
    np.testing.assert_allclose(t2.column("logp_ref").to_numpy(), t1.column("logp_ref").to_numpy(), rtol=1e-6)
    writers = _shard_writers(two)
    assert writers == {s: s % 2 for s in range(6)}  # each shard written by exactly its one owner
    assert {s for s, r in writers.items() if r == 0}.isdisjoint({s for s, r in writers.items() if r == 1})

    # ② kill -9 of the ranks half-way through a slower collection; the rerun resumes and writes the same table.
    slow = tmp_path / "slow.parquet"
    shards = slow.with_name(slow.name + ".shards")
    args = ["collect", *common[:-4], "-s", "len=tests.train.toy_scorers:slow_length", "-s", scorers[3], "-o", slow]
    cmd = [sys.executable, "-m", "train.cli", *map(str, args), "--num-processes", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while len(list(shards.glob("shard-*.parquet"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet")}
    assert 2 <= len(done) < 6 and not slow.exists()
    _can(*args, procs=2)
    assert all(shards.joinpath(n).stat().st_mtime_ns == t for n, t in done.items())  # kept, not redone
    assert pq.read_table(slow).select(["response", "len"]).equals(pq.read_table(one).select(["response", "len"]))

    # ③ train: 4 steps at the same seed and global batch (4 = 1 × 4 = 2 × 2): same loss and weights (both use the
    # log π_ref recorded by collect: the reference check runs on the main process and its verdict is shared).
    cert, prefs = tmp_path / "cert.json", tmp_path / "prefs.parquet"
    _can("dual", one, "--reward", "len", "--constraint", "e=0", "--beta", 0.5, "--out", cert)
    _can("label", one, cert, "--mode", "soft", "--pairs-per-prompt", 2, "-o", prefs)
    # The same pairs without the recorded log π_ref: the reference forward runs, once per distinct response, its
    # batches split over the processes and gathered back in order.
    bare = tmp_path / "bare.parquet"
    table = pq.read_table(prefs)
    pq.write_table(table.drop_columns(["logp_ref_chosen", "logp_ref_rejected"]).replace_schema_metadata(
        table.schema.metadata), bare)  # fmt: skip
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path).state_dict()
    for pairs in (prefs, bare):
        runs = {}
        for procs, batch in ((1, 4), (2, 2)):
            run = tmp_path / f"run{procs}-{pairs.stem}"
            # Plain SGD: Adam turns a gradient that is 0 in one run and 1e-12 of rounding in the other into a full
            # step (measured with AdamW at lr 1e-3: losses 6e-4 apart after 3 steps); SGD keeps rounding as rounding
            # (weights 1e-6 apart relative).
            _can("train", pairs, "--policy", path, "--out", run, "--batch-size", batch, "--lr", 0.5, "--optim",
                 "sgd", "--precision", "fp32", "--seed", 0, "--max_steps", 4, "--logging_steps", 1, "--save_steps",
                 4, procs=procs)  # fmt: skip
            runs[procs] = run
        w1 = AutoModelForCausalLM.from_pretrained(runs[1] / "policy").state_dict()
        w2 = AutoModelForCausalLM.from_pretrained(runs[2] / "policy").state_dict()
        moved = max(float((w1[k] - base[k]).abs().max()) for k in w1)
        assert moved > 1e-3  # the 4 steps did train
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-4 * float(w1[k].abs().max())), k
    losses = {}
    for procs, run in runs.items():
        state = json.loads((run / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
        losses[procs] = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses[1]) == 4
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-4)
    # Files written once, by the main process: the same files as the one-process run, nothing half-written.
    assert sorted(p.name for p in (runs[2] / "policy").iterdir()) == sorted(
        p.name for p in (runs[1] / "policy").iterdir()
    )
    assert not list(runs[2].rglob("*.tmp*"))

    # ⑤ evaluate: the report of two processes (sampling the aligned policy, reading the reference's samples the
    # one-process run kept: the main process reads, every process receives) is the one of one process.
    cache = {"CAN_NO_CACHE": None, "CAN_CACHE_DIR": str(tmp_path / "cache")}
    for name, procs in (("one", None), ("two", 2)):
        res = _can("evaluate", runs[1] / "policy", cert, prompts, *scorers, "--reference", path, "--k", 3,
                   "--max-new-tokens", 5, "--out", tmp_path / f"eval-{name}", procs=procs, env=cache)  # fmt: skip
        assert ("reused from" in res.stderr) == (name == "two")
    r1, r2 = (json.loads((tmp_path / f"eval-{name}" / "evaluation.json").read_text()) for name in ("one", "two"))
    assert r1["rows"] == r2["rows"] and r1["examples"] == r2["examples"]
    assert np.isfinite([r["achieved_gain"] for r in r1["rows"]]).all()


def test_shipped_configs_load():
    """The example DPO options parse into a CanDPOConfig; the accelerate configs are valid accelerate configs (only
    the DDP one runs in CI, in its 2-process CPU form above; DeepSpeed and FSDP are marked untested)."""
    from accelerate.commands.config.config_args import ClusterConfig

    from train.dpo import make_config

    cfg = make_config(ROOT / "run", 0.5, "fp32", ROOT / "examples" / "dpo.yaml")
    assert cfg.gradient_accumulation_steps == 4 and cfg.beta == 0.5
    # warm-up is a tenth of the run whatever its length (issue 24: 20 steps were all of a small run)
    assert cfg.get_warmup_steps(12) == 2 and cfg.get_warmup_steps(1000) == 100
    kinds = {p.stem: ClusterConfig.from_yaml_file(str(p)).distributed_type.value
             for p in (ROOT / "examples" / "accelerate").glob("*.yaml")}  # fmt: skip
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
                     "fsdp": "FSDP"}  # fmt: skip
    for p in (ROOT / "examples" / "accelerate").glob("*.yaml"):
        assert p.stem == "ddp" or "UNTESTED" in p.read_text()


SHARED = """
import json
import sys

from can_jax.errors import CanError
from train import dist

st = dist.state()
calls = []


def make():
    calls.append(st.process_index)
    return {"made_by": st.process_index, "value": [1.5, 2.5]}


def fails():
    raise CanError("the dual did not converge")


got = dist.shared(st, make)
try:
    dist.shared(st, fails)
    err = None
except CanError as e:
    err = str(e)
out = sys.argv[1] + f"/rank{st.process_index}.json"  # one file per rank: their stdout lines may interleave
with open(out, "w") as f:
    json.dump({"rank": st.process_index, "got": got, "calls": calls, "err": err}, f)
st.wait_for_everyone()
st.destroy_process_group()  # a gloo group left to the interpreter's exit may abort one rank
"""


def test_a_shared_artifact_is_made_once_and_handed_to_every_process(tmp_path):
    """`train.dist.shared` under 2 gloo processes: the main process makes the artifact, the other receives the same
    object without making it, and a CanError raised while making it reaches both (neither waits forever)."""
    script = tmp_path / "shared.py"
    script.write_text(SHARED)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1]
    assert rows[0]["got"] == rows[1]["got"] == {"made_by": 0, "value": [1.5, 2.5]}
    assert rows[0]["calls"] == [0] and rows[1]["calls"] == []
    assert rows[0]["err"] == rows[1]["err"] == "the dual did not converge"
