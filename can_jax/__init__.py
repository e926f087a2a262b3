"""can_jax: the numerical core of CAN (arXiv 2405.19544) — the empirical dual, its solver and certificates.

Pure JAX; float64 is switched on by entry points (CLI, tests, benchmarks), never here. Names are imported lazily
(PEP 562): `import can_jax` (or `from can_jax.errors import CanError`, which torch-only stages use) loads no JAX
until a numerical name is first touched. The simulation lab lives in `can_jax.sim`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "can_jax.bias": ["BiasReport", "Corrected", "finite_k_bias", "finite_k_bias_jit"],
    "can_jax.certify": ["kkt_residual", "predicted_outcome", "recession_slope", "reduced_eigs"],
    "can_jax.dual": [
        "DualEval", "device_count", "dual_grad", "dual_hessian", "dual_pass", "dual_value", "prompt_terms",
    ],  # fmt: skip
    "can_jax.errors": [
        "CanError",
        "DegenerateDataError",
        "InfeasibleMarginsError",
        "InvalidArgumentError",
        "OutputError",
        "Outcome",
        "ScoresFormatError",
    ],  # fmt: skip
    "can_jax.inference": ["Bootstrap", "bootstrap", "sandwich_covariance", "standard_error_notes", "standard_errors"],
    "can_jax.result": ["DualResult", "Predicted", "Status"],
    "can_jax.scores": ["Scores", "from_grouped", "from_long", "from_padded"],
    "can_jax.solve": ["solve_dual", "solve_dual_jit"],
    "can_jax.sweep": ["margin_grid", "solve_many", "solve_many_jit", "sweep", "sweep_jit"],
    "can_jax.sim.synthetic": ["synthetic_scores"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'can_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *__all__])
