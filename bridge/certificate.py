"""The dual certificate (DESIGN §6): everything a GPU job needs to trust and reproduce λ*, as JSON."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import numpy as np

from bridge.files import atomic_write_text
from can_jax.errors import CanError
from can_jax.result import Status

FORMAT = "can.dual-certificate"
FORMAT_VERSION = 1


def _clean(x):
    """JSON-safe: numpy scalars to Python, non-finite floats to None (JSON has no inf/NaN)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def build_certificate(
    result,
    names: list[str],
    kinds: list[str],
    margins,
    beta: float,
    data: dict,
    standard_errors=None,
    tol: float | None = None,
    dtype: str = "float64",
) -> dict:
    """The certificate dict for one solved dual. `result` is a (non-vmapped) `DualResult`."""
    from can_jax import __version__

    lam = np.asarray(result.x, float)
    grad = np.asarray(result.jac, float)
    reach = np.asarray(result.reach, float)
    gains = np.asarray(result.predicted.utility_gain, float)
    se = np.full(len(names), np.nan) if standard_errors is None else np.asarray(standard_errors, float)
    status = Status(int(result.status))
    constraints = []
    for j, name in enumerate(names):
        entry = {
            "name": name,
            "kind": kinds[j],
            "margin": float(margins[j]),
            "lambda": lam[j],
            "active": bool(lam[j] > 0),
            "gradient": grad[j],
            "reach": reach[j],
            "predicted_gain": gains[j],
            "standard_error": se[j],
        }
        if kinds[j] == "cost":
            entry["predicted_cost_change"] = -gains[j]
        constraints.append(entry)
    cert = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "can_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "beta": float(beta),
        "lambda": {n: lam[j] for j, n in enumerate(names)},
        "margins": {n: float(margins[j]) for j, n in enumerate(names)},
        "constraints": constraints,
        "status": status.name.lower(),
        "status_code": int(status),
        "converged": status == Status.CONVERGED,
        "message": result.message,
        "iterations": int(result.nit),
        "function_evaluations": int(result.nfev),
        "kkt_residual": float(result.kkt_residual),
        "tolerance": tol,
        "dual_value": float(result.fun),
        "min_hessian_eig": float(result.min_eig),
        "hessian_condition": float(result.cond),
        "predicted": {
            "reward_gain": float(result.predicted.reward_gain),
            "utility_gains": {n: gains[j] for j, n in enumerate(names)},
            "kl": float(result.predicted.kl),
            "ess_fraction": float(result.predicted.ess),
        },
        "dtype": dtype,
        "data": data,
    }
    cert = _clean(cert)
    cert["diagnostics"] = diagnose(cert)
    return cert


ESS_WARN = 0.05
COND_WARN = 1e8


def diagnose(cert: dict) -> list[str]:
    """Plain-language warnings about a certificate's reliability (DESIGN §2: degenerate data gets a diagnostic)."""
    notes = []
    for c in cert["constraints"]:
        if c["reach"] is not None and abs(c["reach"]) <= 1e-12:
            notes.append(
                f"{c['name']!r} does not vary within any prompt: the samples cannot show how a policy changes it"
            )
    one = cert["data"].get("prompts_with_one_response", 0)
    if one:
        notes.append(f"{one} prompt(s) have a single response and carry no information about reweighting")
    ess = cert["predicted"].get("ess_fraction")
    if ess is not None and ess < ESS_WARN:
        notes.append(
            f"π_λ* rests on few samples (effective sample fraction {ess:.3f}): predicted gains are noisy; sample "
            "more responses per prompt or use a larger β"
        )
    cond = cert.get("hessian_condition")
    if cond is None or cond > COND_WARN:
        if any(c["active"] for c in cert["constraints"]):
            notes.append("the dual is ill-conditioned on the active constraints: λ* is poorly determined")
    return notes


def write_certificate(path: str | os.PathLike, cert: dict) -> Path:
    return atomic_write_text(path, json.dumps(cert, indent=2) + "\n")


def read_certificate(path: str | os.PathLike, require_converged: bool = True) -> dict:
    """Reads and checks a certificate; refuses one that did not converge unless told otherwise."""
    path = Path(path)
    try:
        cert = json.loads(path.read_text())
    except FileNotFoundError:
        raise CanError(f"certificate not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CanError(f"{path} is not a JSON certificate: {err}") from None
    if not isinstance(cert, dict) or cert.get("format") != FORMAT:
        raise CanError(f"{path} is not a can dual certificate")
    if cert.get("format_version") != FORMAT_VERSION:
        raise CanError(
            f"{path}: certificate format version {cert.get('format_version')} is not supported "
            f"(this can reads version {FORMAT_VERSION})"
        )
    if require_converged and not cert.get("converged"):
        raise CanError(f"{path}: the dual solve did not converge ({cert.get('message')})")
    return cert


def data_summary(loaded, reward: str, prompt_id: str) -> dict:
    """The certificate's `data` block for a `bridge.tables.LoadedScores`."""
    k = np.asarray(loaded.scores.mask.sum(axis=1))
    return {
        "path": loaded.path,
        "sha256": loaded.sha256,
        "reward": reward,
        "prompt_id": prompt_id,
        "n_prompts": int(k.size),
        "n_responses": int(k.sum()),
        "n_rows": loaded.n_rows,
        "dropped_rows": loaded.dropped_rows,
        "prompts_with_one_response": int((k < 2).sum()),
        # Where E_ref[g_j | x] came from: a reference column (PeCAN's −β·KL) or the responses' sample mean.
        "reference_expectation": {n: (loaded.ref_columns or {}).get(n, "sample mean") for n in loaded.names},
    }


def solve_and_certify(loaded, beta: float, tol, max_iter: int, se: bool, data: dict):
    """Solves the dual of a loaded table and builds its certificate: (DualResult, certificate dict).

    Out-of-reach margins raise `InfeasibleMarginsError` with the one-line diagnosis (never a huge λ).
    """
    import jax.numpy as jnp

    from can_jax.certify import infeasibility_message
    from can_jax.errors import InfeasibleMarginsError
    from can_jax.inference import solve_with_errors
    from can_jax.solve import default_tol, solve_dual_jit

    dtype = loaded.scores.reward.dtype
    margins = jnp.asarray(loaded.margins, dtype)
    tol = default_tol(dtype) if tol is None else tol
    if se:
        result, errs = solve_with_errors(loaded.scores, margins, beta, tol=tol, max_iter=max_iter)
    else:
        result, errs = solve_dual_jit(loaded.scores, margins, beta, tol=tol, max_iter=max_iter), None
    if int(result.status) in (Status.INFEASIBLE, Status.DIVERGED):
        raise InfeasibleMarginsError(infeasibility_message(result, loaded.names, loaded.margins))
    if errs is not None:
        errs = np.asarray(errs) if int(result.status) == Status.CONVERGED else None
    cert = build_certificate(
        result,
        loaded.names,
        loaded.kinds,
        loaded.margins,
        beta,
        data=data,
        standard_errors=errs,
        tol=tol,
        dtype=str(jnp.dtype(dtype)),
    )
    return result, cert
