"""A second call on data of the same shapes compiles nothing, for every public numerical function and the CLI's
JAX stages run twice in one process.

Why it matters beyond speed: each program XLA compiles for the CPU keeps memory mappings until its cache entry goes.
Public functions that ran their loops outside `jit` built a new closure, hence a new program, on every call
(solve_dual compiled 3 programs, ~0.6 s and ~450 mappings per call): a process calling them in a loop — a notebook,
a sweep, this suite — reached Linux's vm.max_map_count (65,530) and XLA segfaulted in its next compile.
Compilations are counted with jax.monitoring's backend-compile event, JAX's own record of each XLA compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import groups_to_scores, make_groups

ROOT = Path(__file__).resolve().parents[2]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class Compiles:
    def __init__(self):
        self.count = 0

    def __call__(self, event, *args, **kwargs):
        if event == BACKEND_COMPILE:
            self.count += 1


@pytest.fixture
def compiles():
    counter = Compiles()
    jax.monitoring.register_event_duration_secs_listener(counter)
    yield counter
    jax.monitoring.unregister_event_duration_listener(counter)


def _same_shapes(seed: int):
    sc = groups_to_scores(make_groups(seed, 120, 6, 3, k_min=6))  # every prompt has 6 responses: same shapes
    assert sc.reward.shape == (120, 6)
    return sc


def _cases():
    from can_jax import bias, certify, dual, inference, refine, solve
    from can_jax.dual import to_blocks
    from can_jax.sweep import solve_many, sweep

    b = jnp.array([0.1, 0.2, 0.05])
    lam = jnp.array([0.3, 0.0, 0.7])
    hess = jnp.eye(3)

    def float32(s):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float64 else x, s)

    def solved(s):
        return solve.solve_dual(s, b, 1.0)

    return {
        "solve_dual": solved,
        "solve_dual float32 scores in float64": lambda s: solve.solve_dual(float32(s), b, 1.0, dtype=jnp.float64),
        "dual_pass": lambda s: dual.dual_pass(lam, s, b, 1.0),
        "dual_value": lambda s: dual.dual_value(lam, s, b, 1.0),
        "dual_grad": lambda s: dual.dual_grad(lam, s, b, 1.0),
        "dual_hessian": lambda s: dual.dual_hessian(lam, s, b, 1.0),
        "predicted_outcome": lambda s: certify.predicted_outcome(lam, to_blocks(s), 1.0),
        "recession_slope": lambda s: certify.recession_slope(to_blocks(s), lam, b, centre=True),
        "edge_gains": lambda s: certify.edge_gains(to_blocks(s), jnp.eye(3)),
        "sensitivity": lambda s: dual.sensitivity(lam, s, 1.0),
        "refine_step": lambda s: refine.refine_step(refine.refine_init(lam, hess), lam * s.reward[0, :3], b),
        "finite_k_bias": lambda s: bias.finite_k_bias(lam, s, b, 1.0),
        "standard_errors": lambda s: inference.standard_errors(solved(s), s, b, 1.0),
        "bootstrap": lambda s: inference.bootstrap(jax.random.key(0), s, b, 1.0, n_boot=3),
        "sweep": lambda s: sweep(s, jnp.stack([b, 2 * b]), 1.0),
        "solve_many": lambda s: solve_many(jax.tree.map(lambda x: jnp.stack([x, x]), s), b, 1.0),
    }


def _sim_cases():
    """The simulation lab's training loops (benchmarks call them per world and step size)."""
    from can_jax.sim.policy import Pairs, init_policy, train_dpo, train_lagrangian
    from can_jax.sim.primal_dual import gda
    from can_jax.sim.worlds import make_world, tilted_policy

    def world(seed):
        return make_world(jax.random.key(seed), 20, 5, 2)

    def pairs(w):
        prompt = jnp.repeat(jnp.arange(20), 2)
        target = jax.nn.sigmoid(w.reward[prompt, 0] - w.reward[prompt, 1])
        return Pairs(prompt, jnp.zeros(40, int), jnp.ones(40, int), target)

    lam = jnp.array([0.5, 0.2])
    return {
        "train_dpo": lambda seed: train_dpo(init_policy(jax.random.key(1), world(seed)), world(seed),
                                            pairs(world(seed)), 1.0, 20, 0.05),
        "train_lagrangian": lambda seed: train_lagrangian(init_policy(jax.random.key(1), world(seed)), world(seed),
                                                          lam, 1.0, 20, 0.05),
        "gda": lambda seed: gda(world(seed), 1.0, tilted_policy(world(seed), lam, 1.0), 20, lr_lambda=0.1),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_sim_cases()))
def test_a_second_training_loop_compiles_nothing(name, compiles):
    fn = _sim_cases()[name]
    first = jax.block_until_ready(fn(0))
    before = compiles.count
    second = jax.block_until_ready(fn(1))
    assert compiles.count == before, f"{name}: {compiles.count - before} XLA compilation(s) on the second call"
    assert not np.allclose(np.asarray(jax.tree.leaves(first)[-1]), np.asarray(jax.tree.leaves(second)[-1]))


@pytest.mark.parametrize("name", list(_cases()))
def test_a_second_call_compiles_nothing(name, compiles):
    fn = _cases()[name]  # fresh closures each time, as a user's loop makes them
    first = jax.block_until_ready(fn(_same_shapes(0)))
    before = compiles.count
    second = jax.block_until_ready(fn(_same_shapes(1)))
    assert compiles.count == before, f"{name}: {compiles.count - before} XLA compilation(s) on the second call"
    # The second call computed on its own data (not a cached answer).
    leaves = [np.asarray(x) for x in jax.tree.leaves(first) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    again = [np.asarray(x) for x in jax.tree.leaves(second) if np.issubdtype(np.asarray(x).dtype, np.floating)]
    if name != "refine_step":  # depends on the data through one row only
        assert any(not np.allclose(a, c, equal_nan=True) for a, c in zip(leaves, again))


def _table(path, seed):
    rows = []
    for i, (r, g) in enumerate(make_groups(seed, 80, 6, 2, k_min=6)):
        for k in range(len(r)):
            rows.append({"pid": i, "prompt": f"prompt {i}", "response": f"response {k}", "helpful": r[k],
                         "safe": g[k, 0], "toxic": -g[k, 1]})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)


def cli_twice(tmp) -> tuple[int, dict, dict]:
    """`can dual` (bias and standard errors on), `can sweep` and `can label` on two tables of the same shape in this
    process: the XLA compilations of the second round, and both certificates."""
    from typer.testing import CliRunner

    from train.cli import app

    runner, tmp, counter = CliRunner(), Path(tmp), Compiles()

    def stages(tag, seed):
        table, cert = tmp / f"{tag}.parquet", tmp / f"{tag}.json"
        _table(table, seed)
        common = ["--reward", "helpful", "--prompt-id", "pid", "--constraint", "safe=0.2", "--cost", "toxic=0.1",
                  "--beta", "0.5"]  # fmt: skip
        for args in (["dual", table, *common, "--out", cert],
                     ["sweep", table, *common, "--vary", "safe", "--values", "0.1,0.2,0.3", "--no-plot"],
                     ["label", table, cert, "-o", tmp / f"{tag}-prefs.parquet"]):  # fmt: skip
            res = runner.invoke(app, [str(a) for a in args])
            assert res.exit_code == 0, (args[0], res.output)
        return json.loads(cert.read_text())

    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        first = stages("a", 0)
        before = counter.count
        second = stages("b", 1)
        return counter.count - before, first, second
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)


def test_cli_stages_twice_in_one_process_compile_once(tmp_path):
    """In the suite's process, with the persistent compile cache off (the suite's CAN_NO_CACHE)."""
    n, first, second = cli_twice(tmp_path)
    assert n == 0, f"{n} XLA compilation(s) on the second run"
    assert first["lambda"] != second["lambda"]


def test_cli_stages_twice_with_the_caches_on_compile_once(tmp_path):
    """As a user's process runs them: the persistent compile cache and the export cache on (a child process, so
    that the suite's own process keeps them off)."""
    env = {k: v for k, v in os.environ.items() if k != "CAN_EXPORT_CACHE"}  # its default: on
    env.update(CAN_NO_CACHE="0", CAN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    code = (
        "import json, sys, jax; jax.config.update('jax_enable_x64', True); "
        "from tests.can_jax.test_compile_once import cli_twice; "
        "n, a, b = cli_twice(sys.argv[1]); print(json.dumps([n, a['lambda'], b['lambda']]))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    n, lam_a, lam_b = json.loads(res.stdout.strip().splitlines()[-1])
    assert n == 0, f"{n} XLA compilation(s) on the second run"
    assert lam_a != lam_b
    assert any((tmp_path / "cache" / "jax" / "exports").glob("*.jaxexport")), "the export cache was not used"
