"""The export cache of the dual's programs (can_jax/aot.py, on with the persistent cache, off with
CAN_EXPORT_CACHE=0): same answers as the jitted call, entries keyed by shape, damaged entries replaced, tracers and
a missing cache bypass it, and a second `can dual` process that traces nothing. These run in child processes: the
suite's own process keeps the persistent caches off (tests/conftest.py)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECKS = textwrap.dedent('''
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from pathlib import Path
    from can_jax import aot
    from can_jax.inference import solve_with_errors
    from can_jax.solve import solve_dual_jit
    from tests.conftest import groups_to_scores, make_groups
    from tests.reference import ref_solve_lbfgsb

    M = np.array([0.3, 0.15, -0.5])
    STATIC = {"max_iter": 100, "dtype": jnp.dtype(jnp.float64), "devices": 1}
    tmp = Path(sys.argv[1])

    # Without a compile cache directory the function is called as it is.
    assert aot.cache_dir() is None
    jax.config.update("jax_compilation_cache_dir", str(tmp / "jax"))
    where = tmp / "jax" / "exports"
    entries = lambda: sorted(where.glob("*.jaxexport")) if where.exists() else []

    groups = make_groups(3, 40, 6, 3)
    scores = groups_to_scores(groups)
    first = aot.call("solve_dual", solve_dual_jit, scores, jnp.asarray(M), 1.0, tol=1e-9, static=STATIC)
    assert len(entries()) == 1
    direct = solve_dual_jit(scores, jnp.asarray(M), 1.0, tol=1e-9, **STATIC)
    np.testing.assert_allclose(np.asarray(first.x), np.asarray(direct.x), rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(first.x), ref_solve_lbfgsb(groups, M, 1.0), atol=1e-6)
    assert type(first) is type(direct) and int(first.status) == int(direct.status)

    # The second call reads the entry: nothing is exported again.
    real = aot._export
    aot._export = lambda *a, **k: (_ for _ in ()).throw(AssertionError("exported again"))
    again = aot.call("solve_dual", solve_dual_jit, scores, jnp.asarray(M), 1.0, tol=1e-9, static=STATIC)
    np.testing.assert_array_equal(np.asarray(again.x), np.asarray(first.x))
    aot._export = real

    # Keyed by shape (N = 30 and 31 give two entries); a damaged entry is replaced, with the same answers.
    a = groups_to_scores(make_groups(1, 30, 5, 3))
    b = groups_to_scores(make_groups(2, 31, 5, 3))
    out_a = aot.call("solve_with_errors", solve_with_errors, a, jnp.asarray(M), 1.0, static=STATIC)
    aot.call("solve_with_errors", solve_with_errors, b, jnp.asarray(M), 1.0, static=STATIC)
    assert len(entries()) == 3
    for path in entries():
        path.write_bytes(b"not an export")
    aot._LOADED.clear()  # as a new process finds them
    redo = aot.call("solve_with_errors", solve_with_errors, a, jnp.asarray(M), 1.0, static=STATIC)
    np.testing.assert_array_equal(np.asarray(redo[0].x), np.asarray(out_a[0].x))
    np.testing.assert_array_equal(np.asarray(redo[1]), np.asarray(out_a[1]))
    assert any(p.stat().st_size > 100 for p in entries())

    # Under vmap over beta the leaves are tracers: the jitted function is called as it is, nothing is written.
    n = len(entries())
    small = groups_to_scores(make_groups(4, 20, 4, 3))
    lam = jax.vmap(lambda bt: aot.call("solve_dual", solve_dual_jit, small, jnp.asarray(M), bt,
                                       static=STATIC).x)(jnp.array([0.5, 1.0]))
    assert lam.shape == (2, 3) and len(entries()) == n
    print("OK")
''')


def _env(tmp_path, **extra):
    """The child's environment, with the CLI's compile cache on (the suite's own process keeps it off)."""
    env = {k: v for k, v in os.environ.items() if k != "CAN_NO_CACHE"}
    return {**env, "PYTHONPATH": str(ROOT), "CAN_CACHE_DIR": str(tmp_path / "cache"), **extra}


def test_cached_programs_equal_the_jitted_call_and_scipy(tmp_path):
    res = subprocess.run([sys.executable, "-c", CHECKS, str(tmp_path)], env=_env(tmp_path, CAN_EXPORT_CACHE="1"),
                         capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stderr[-3000:]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_on_with_the_persistent_cache_off_with_0(tmp_path, value, on):
    code = ("import jax; from can_jax import aot; print(aot.cache_dir()); "
            f"jax.config.update('jax_compilation_cache_dir', {str(tmp_path)!r}); print(aot.cache_dir())")  # fmt: skip
    env = {k: v for k, v in _env(tmp_path).items() if k != "CAN_EXPORT_CACHE"}
    if value is not None:
        env["CAN_EXPORT_CACHE"] = value
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["None", str(tmp_path / "exports") if on else "None"], res.stderr[-2000:]


def test_a_second_can_dual_process_traces_no_solve(tmp_path):
    rng = np.random.default_rng(0)
    n, k = 50, 6
    table = pa.table({"prompt_id": np.repeat(np.arange(n), k), "reward": rng.normal(size=n * k),
                      "safe": rng.normal(size=n * k)})  # fmt: skip
    pq.write_table(table, tmp_path / "s.parquet")
    env = _env(tmp_path, JAX_LOG_COMPILES="1", CAN_EXPORT_CACHE="1")
    cmd = [sys.executable, "-m", "train.cli", "--verbose", "dual", str(tmp_path / "s.parquet"), "--reward", "reward",
           "--constraint", "safe=0.1", "--beta", "1", "--json"]  # fmt: skip
    runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    traced = [{f for f in ("_solve_with_errors", "finite_k_bias") if f"tracing {f} for" in r.stderr} for r in runs]
    assert traced == [{"_solve_with_errors", "finite_k_bias"}, set()]
    certs = [json.loads(r.stdout) for r in runs]
    assert certs[0]["lambda"] == certs[1]["lambda"] and certs[0]["bias"] == certs[1]["bias"]
