"""`can` in a user's project folder that holds its own `train.py`, `bridge.py` and `can_jax.py` (most ML projects have
a `train.py`): every stage runs from the installed `can` command, a `module:function` scorer is read from the folder
without its neighbours standing in for our packages, and `--num-processes` / `--accelerate-config` launch the
command on 2 processes (gloo, CPU) with the results of one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("trl")

CAN = Path(sys.executable).with_name("can")
SCORERS = ["-s", "e=myscores:e_share", "-s", "brev=myscores:brevity"]
MYSCORES = '''
import helpers  # a neighbour module of the user's: found while this file is loaded


def e_share(prompts, responses):
    return [r.count("e") / (len(r) + 1.0) for r in responses]


def brevity(prompts, responses):
    return [helpers.scale(-len(r)) for r in responses]
'''


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text('print("the user\'s train.py ran")\nraise SystemExit(3)\n')
    (folder / "bridge.py").write_text('raise ImportError("the user\'s bridge.py was imported")\n')
    (folder / "can_jax.py").write_text('raise ImportError("the user\'s can_jax.py was imported")\n')
    (folder / "helpers.py").write_text("def scale(x):\n    return x / 20.0\n")
    (folder / "myscores.py").write_text(MYSCORES)
    (folder / "prompts.txt").write_text("".join(f"tell me about item {i}.\n" for i in range(24)))
    (folder / "calibration.txt").write_text("".join(f"say something about topic {i}.\n" for i in range(48)))
    (folder / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
        "mixed_precision: 'no'\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
    )
    return folder


def _can(folder: Path, *args, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """The installed `can` command, run as a user runs it: in their folder, nothing of ours on PYTHONPATH."""
    assert CAN.exists(), f"{CAN}: the `can` entry point is not installed (pip install -e '.[train]')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="0")
    for key in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "CAN_LAUNCHED"):
        env.pop(key, None)
    res = subprocess.run([str(CAN), *map(str, args)], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for out in (res.stdout, res.stderr):
        assert "the user's" not in out, out[-3000:]
    return res


@pytest.fixture(scope="module")
def chain(tiny_lm, tmp_path_factory):
    """collect (under the accelerate config: 2 processes) → dual → label → train (--num-processes 2), all in a
    project folder with its own train.py, bridge.py and can_jax.py."""
    _, _, lm = tiny_lm
    folder = _project(tmp_path_factory.mktemp("project"))
    _can(folder, "collect", "prompts.txt", "--policy", lm, *SCORERS, "--k", 8, "--max-new-tokens", 12,
         "--shard-size", 4, "-o", "scores.parquet", "--accelerate-config", "accelerate.yaml")  # fmt: skip
    from bridge.dual import margins_at_reach

    margin = margins_at_reach(folder / "scores.parquet", "e", ["brev"], 0.1, 0.5)[0]
    _can(folder, "dual", "scores.parquet", "--reward", "e", "--constraint", margin, "--beta", 0.1, "--out",
         "cert.json")  # fmt: skip
    _can(folder, "label", "scores.parquet", "cert.json", "--mode", "soft", "--pairs-per-prompt", 8, "-o",
         "prefs.parquet")  # fmt: skip
    _can(folder, "train", "prefs.parquet", "--policy", lm, "--out", "run", "--epochs", 3, "--lr", 3e-3,
         "--batch-size", 8, "--max-length", 64, "--precision", "fp32", "--num-processes", 2)  # fmt: skip
    return folder, lm


def test_stages_run_in_a_project_folder(chain):
    folder, _ = chain
    table = pq.read_table(folder / "scores.parquet").to_pydict()
    assert len(table["response"]) == 24 * 8
    # The user's scorers scored the sampled responses (recomputed here from the text).
    resp = table["response"]
    np.testing.assert_allclose(table["e"], [r.count("e") / (len(r) + 1.0) for r in resp], rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["brev"], [-len(r) / 20.0 for r in resp], rtol=0, atol=1e-12)
    cert = json.loads((folder / "cert.json").read_text())
    assert cert["status"] == "converged"
    assert (folder / "prefs.parquet").exists()
    run = json.loads((folder / "run" / "run.json").read_text())
    assert run["processes"] == 2
    assert (folder / "run" / "policy" / "config.json").exists()


def test_refine_on_two_processes_steps_like_one(chain):
    folder, lm = chain
    lams = {}
    for procs in (1, 2):
        out = f"refine{procs}"
        _can(folder, "refine", "run/policy", "--scores", "scores.parquet", "--prompts", "calibration.txt", *SCORERS,
             "--reference", lm, "--out", out, "--rounds", 1, "--k", 8, "--max-new-tokens", 12, "--mode", "soft",
             "--pairs-per-prompt", 8, "--epochs", 1, "--lr", 3e-3, "--batch-size", 8 // procs, "--max-length", 64,
             "--precision", "fp32", "--start", "reference", "--no-insample", "--num-processes", procs)  # fmt: skip
        cert = folder / out / "round-1" / "certificate.json"
        assert cert.exists(), "round 0 was on target: no step to compare"
        lams[procs] = json.loads(cert.read_text())["lambda"]
    assert lams[2].keys() == lams[1].keys()
    for name in lams[1]:
        np.testing.assert_allclose(lams[2][name], lams[1][name], rtol=1e-6)


def test_a_user_mistake_on_two_processes_is_one_line(chain, tmp_path):
    folder, lm = chain
    res = _can(folder, "train", "no-such-prefs.parquet", "--policy", lm, "--out", tmp_path / "r", "--num-processes",
               2, check=False)  # fmt: skip
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), res.stderr
    assert "no-such-prefs.parquet" in errors[0] and "Traceback" not in res.stdout + res.stderr
    # the launcher's own options are checked before any process starts
    for args, says in [(["--num-processes", 0], "--num-processes"), (["--accelerate-config", "none.yaml"], "none")]:
        res = _can(folder, "collect", "prompts.txt", "--policy", lm, *SCORERS, *args, check=False)
        assert res.returncode == 1 and res.stderr.count("error:") == 1 and says in res.stderr, res.stderr


def test_a_user_module_named_like_ours_is_read_from_its_file(chain, tmp_path):
    """`-s x=train:fn` means the user's train.py (which exits 3 here): one line naming the scorer, not our package."""
    folder, lm = chain
    res = subprocess.run([str(CAN), "collect", "prompts.txt", "--policy", str(lm), "-s", "x=train:fn", "--k", "2",
                          "--max-new-tokens", "4", "-o", str(tmp_path / "t.parquet")], cwd=folder, capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["error: scorer 'x': cannot import 'train:fn': SystemExit: 3"]


def test_the_docs_and_help_launch_with_the_options():
    from typer.testing import CliRunner

    from train.cli import app

    root = Path(__file__).resolve().parents[2]
    for doc in [root / "README.md", *(root / "docs").rglob("*.md"), *(root / "examples").rglob("*.yaml")]:
        assert "-m train.cli" not in doc.read_text(), doc
    for cmd in ("collect", "logratios", "train", "prealign", "evaluate", "refine", "demo"):
        text = CliRunner().invoke(app, [cmd, "--help"], terminal_width=200).output
        assert "--num-processes" in text and "--accelerate-config" in text and "-m train.cli" not in text, cmd
    for cmd in ("dual", "label", "sweep", "stability"):
        assert "-m train.cli" not in CliRunner().invoke(app, [cmd, "--help"], terminal_width=200).output
