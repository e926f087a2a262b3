"""The export cache of the dual's programs (can_jax/aot.py): same answers as the jitted call, entries keyed by
shape, damaged entries replaced, and a second `can dual` process that traces nothing."""

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

from can_jax import aot
from can_jax.inference import solve_with_errors
from can_jax.solve import solve_dual_jit
from tests.conftest import groups_to_scores, make_groups
from tests.reference import ref_solve_lbfgsb

ROOT = Path(__file__).resolve().parents[2]
MARGINS = np.array([0.3, 0.15, -0.5])
STATIC = {"max_iter": 100, "dtype": jnp.dtype(jnp.float64), "devices": 1}


@pytest.fixture
def cache(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    yield tmp_path / "jax" / "exports"
    jax.config.update("jax_compilation_cache_dir", before)


def _entries(where: Path) -> list[Path]:
    return sorted(where.glob("*.jaxexport")) if where.exists() else []


def test_cached_solve_equals_the_jitted_call_and_scipy(cache, monkeypatch):
    groups = make_groups(3, 40, 6, 3)
    scores = groups_to_scores(groups)
    first = aot.call("solve_dual", solve_dual_jit, scores, jnp.asarray(MARGINS), 1.0, tol=1e-9, static=STATIC)
    assert len(_entries(cache)) == 1
    direct = solve_dual_jit(scores, jnp.asarray(MARGINS), 1.0, tol=1e-9, **STATIC)
    np.testing.assert_allclose(np.asarray(first.x), np.asarray(direct.x), rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(first.x), ref_solve_lbfgsb(groups, MARGINS, 1.0), atol=1e-6)
    assert type(first) is type(direct) and int(first.status) == int(direct.status)

    # The second call reads the entry: nothing is exported again.
    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(aot, "_export", no_export)
    again = aot.call("solve_dual", solve_dual_jit, scores, jnp.asarray(MARGINS), 1.0, tol=1e-9, static=STATIC)
    np.testing.assert_array_equal(np.asarray(again.x), np.asarray(first.x))


def test_entries_are_keyed_by_shape_and_damaged_ones_replaced(cache):
    a = groups_to_scores(make_groups(1, 30, 5, 3))
    b = groups_to_scores(make_groups(2, 31, 5, 3))
    out_a = aot.call("solve_with_errors", solve_with_errors, a, jnp.asarray(MARGINS), 1.0, static=STATIC)
    aot.call("solve_with_errors", solve_with_errors, b, jnp.asarray(MARGINS), 1.0, static=STATIC)
    assert len(_entries(cache)) == 2  # N = 30 and N = 31
    for path in _entries(cache):
        path.write_bytes(b"not an export")
    again = aot.call("solve_with_errors", solve_with_errors, a, jnp.asarray(MARGINS), 1.0, static=STATIC)
    np.testing.assert_array_equal(np.asarray(again[0].x), np.asarray(out_a[0].x))
    np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(out_a[1]))
    assert any(p.stat().st_size > 100 for p in _entries(cache))  # rewritten


def test_no_cache_dir_or_a_trace_calls_the_function_directly(tmp_path):
    scores = groups_to_scores(make_groups(4, 20, 4, 3))
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert aot.cache_dir() is None
        out = aot.call("solve_dual", solve_dual_jit, scores, jnp.asarray(MARGINS), 1.0, static=STATIC)
        assert int(out.status) == 0 or out.x.shape == (3,)
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))

        # Under vmap over β the leaves are tracers: the jitted function is called as it is, nothing is written.
        lam = jax.vmap(lambda b: aot.call("solve_dual", solve_dual_jit, scores, jnp.asarray(MARGINS), b,
                                          static=STATIC).x)(jnp.array([0.5, 1.0]))  # fmt: skip
        assert lam.shape == (2, 3)
        assert _entries(tmp_path / "exports") == []
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_second_can_dual_process_traces_no_solve(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 50, 6
    table = pa.table({"prompt_id": np.repeat(np.arange(n), k), "reward": rng.normal(size=n * k),
                      "safe": rng.normal(size=n * k)})  # fmt: skip
    pq.write_table(table, tmp_path / "s.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAN_CACHE_DIR": str(tmp_path / "cache"), "JAX_LOG_COMPILES": "1"}
    cmd = [sys.executable, "-m", "train.cli", "--verbose", "dual", str(tmp_path / "s.parquet"), "--reward", "reward",
           "--constraint", "safe=0.1", "--beta", "1", "--json"]  # fmt: skip
    runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    traced = [{f for f in ("_solve_with_errors", "finite_k_bias") if f"tracing {f} for" in r.stderr} for r in runs]
    assert traced == [{"_solve_with_errors", "finite_k_bias"}, set()]
    certs = [json.loads(r.stdout) for r in runs]
    assert certs[0]["lambda"] == certs[1]["lambda"] and certs[0]["bias"] == certs[1]["bias"]
