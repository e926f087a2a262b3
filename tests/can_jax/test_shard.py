"""Prompts sharded over two CPU devices (issue 22): the same λ and bias as on one device, and the count reported.

XLA_FLAGS must be set before JAX is imported, so the two-device run is a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from can_jax.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from can_jax.bias import finite_k_bias_jit
from can_jax.dual import device_count
from can_jax.sim.synthetic import synthetic_scores
from can_jax.solve import solve_dual_jit

sc = synthetic_scores(jax.random.key(7), 1001, 12, 3, ragged=True)  # odd N: padded to 2 devices × blocks
b = jnp.array([0.3, 0.2, -1.0])
out = {"local_devices": jax.local_device_count()}
for d in (1, None):
    # block=32: 32 blocks, every device scans several; warm start off at this size either way.
    res = solve_dual_jit(sc, b, 0.8, block=32, devices=d)
    rep = finite_k_bias_jit(res.x, sc, b, 0.8, block=32, devices=d)
    out[str(device_count(d))] = {"x": res.x.tolist(), "status": int(res.status), "nit": int(res.nit),
                                 "fun": float(res.fun), "kl": float(res.predicted.kl),
                                 "corrected": rep.lam.corrected.tolist(), "se": rep.lam.se.tolist()}
print(json.dumps(out))
"""


def test_two_devices_give_the_one_device_lambda_and_bias():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["local_devices"] == 2
    one, two = out["1"], out["2"]
    assert one["status"] == two["status"] == 0
    for key in ("x", "corrected", "se"):
        assert max(abs(a - b) for a, b in zip(one[key], two[key])) <= 1e-9, key
    assert abs(one["fun"] - two["fun"]) <= 1e-9 and abs(one["kl"] - two["kl"]) <= 1e-9


def test_device_count_checks_its_argument():
    import jax

    from can_jax.dual import device_count

    assert device_count(None) == jax.local_device_count()
    assert device_count(1) == 1
    with pytest.raises(InvalidArgumentError):
        device_count(jax.local_device_count() + 1)
