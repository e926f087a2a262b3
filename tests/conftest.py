import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The CLI keeps JAX's compiled programs in $CAN_CACHE_DIR (default ~/.cache/can): the tests use a fresh one of their
# own, as CI does, and never read or fill the user's.
if "CAN_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["CAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="can-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CAN_CACHE_DIR"], ignore_errors=True)

# In this one long process the CLI's in-process runs would turn on JAX's persistent compilation cache for every
# later test: the tests keep it off in process, so that each test compiles what it needs; the runs in processes of
# their own that test the caches take this variable out. (The segfaults once seen with it on were the exhaustion
# of memory mappings that _drop_compiled_programs and compiled loops in can_jax now prevent.)
os.environ.setdefault("CAN_NO_CACHE", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Each program XLA compiles for the CPU keeps ~3 memory mappings until its cache entry goes; one process running
    the whole suite compiled enough programs to reach Linux's vm.max_map_count (65,530 mappings) near its end, and
    XLA then segfaulted in its next compile (in CI and in two local runs, 2026-12-05). Dropping JAX's caches after
    every module keeps the count at a module's own."""
    yield
    jax.clear_caches()


def make_groups(seed: int, n: int, k_max: int, m: int, k_min: int = 2, rho: float = -0.5, offset: float = 20.0):
    """A ragged problem as plain lists: [(r_i [K_i], G_i [K_i, m])], reward trading off against utilities."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        k = int(rng.integers(k_min, k_max + 1))
        h = rng.normal(size=k)
        r = offset + 3.0 * h + 0.5 * rng.normal(size=k) + 2.0 * rng.normal()
        g = rho * h[:, None] + np.sqrt(1 - rho**2) * rng.normal(size=(k, m)) + rng.normal(size=m)
        groups.append((r, g))
    return groups


def groups_to_scores(groups, k: int | None = None, dtype=None):
    from can_jax.scores import from_long

    idx = np.concatenate([np.full(len(r), i) for i, (r, _) in enumerate(groups)])
    r = np.concatenate([r for r, _ in groups])
    g = np.concatenate([g for _, g in groups])
    return from_long(idx, r, g, dtype=dtype, max_responses=k)


@pytest.fixture(scope="session")
def small_groups():
    return make_groups(0, 60, 8, 3)


@pytest.fixture(scope="session")
def small_scores(small_groups):
    return groups_to_scores(small_groups)
