"""The dual stage ② (`can dual`; DESIGN §2): a scores table and margins in, a `Certificate` out.

`DualConfig` holds every option with its default (the CLI's `can dual` is a thin wrapper checked against it), and
`run(config)` is the stage: load and validate the table, turn absolute limits into margins, solve, estimate the
finite-K bias, and build the certificate with its scorers, limits and PeCAN blocks. The CLI, the demos and the
correction rounds call this same function, so their certificates cannot diverge.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bridge.certificate import Certificate
from bridge.tables import ConstraintSpec, load_for, load_scores, parse_constraint
from can_jax.errors import CanError, InvalidArgumentError


@dataclass
class DualConfig:
    """Options of the dual stage (the defaults of `can dual`)."""

    scores: str  # the scores table
    reward: str  # its reward column
    beta: float  # KL weight β > 0
    constraint: list = field(default_factory=list)  # COL=MARGIN utilities
    cost: list = field(default_factory=list)  # COL=MARGIN costs (negated on the way in)
    cost_at_most: list = field(default_factory=list)  # COL=d: E[cost] ≤ d (margin E_ref[cost] − d)
    at_least: list = field(default_factory=list)  # COL=τ: E[utility] ≥ τ (margin τ − E_ref[utility])
    prompt_id: str = "prompt_id"
    float32: bool = False
    tol: float | None = None  # KKT tolerance (default 1e-9 float64, 1e-5 float32)
    max_iter: int = 100
    se: bool = True  # sandwich standard errors
    bias: bool = True  # finite-K bias block (within-prompt jackknife)
    drop_bad_rows: bool = False
    pecan: bool = False  # a PeCAN table (`can collect --aligned`)
    kl: str = "token"  # PeCAN: E_ref[g̃ | x] from the token-level KL or the sample mean
    devices: int | None = None  # local JAX devices to shard prompts over (None: all of them)

    def check(self) -> None:
        """Refuses options no solve could use (one line each)."""
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise InvalidArgumentError(f"--beta must be a positive finite number, got {self.beta}")
        if self.max_iter < 1:
            raise InvalidArgumentError(f"--max-iter must be at least 1, got {self.max_iter}")
        if self.tol is not None and not (math.isfinite(self.tol) and self.tol > 0):
            raise InvalidArgumentError(f"--tol must be a positive finite number, got {self.tol}")


def load_table(scores, reward, constraint=(), cost=(), prompt_id="prompt_id", float32=False, drop_bad_rows=False,
               pecan_kl=None, extra_specs=(), keep_float32=False):  # fmt: skip
    """A scores table read for the dual: --constraint/--cost texts parsed, PeCAN reference columns found; with
    `keep_float32` float32 columns stay float32 (`bridge.dual.solve` computes in `LoadedScores.dtype`)."""
    import jax.numpy as jnp

    specs = [parse_constraint(c, "utility") for c in constraint or []]
    specs += [parse_constraint(c, "cost") for c in cost or []]
    specs += list(extra_specs)  # absolute limits (bridge.limits), margins set after loading
    ref_columns = None
    if pecan_kl is not None:
        from bridge.pecan import reference_columns

        ref_columns = reference_columns(scores, reward, [c.column for c in specs], pecan_kl)
    return load_scores(scores, reward, specs, prompt_id=prompt_id, drop_bad_rows=drop_bad_rows,
                       dtype=jnp.float32 if float32 else jnp.float64, ref_columns=ref_columns,
                       keep_float32=keep_float32)  # fmt: skip


def run(cfg: DualConfig) -> Certificate:
    """The dual stage: the certificate of λ* for `cfg` (converged or not: `Certificate.converged` says).

    Out-of-reach margins raise `InfeasibleMarginsError` naming them; bad tables and options raise `CanError`.
    """

    from bridge.limits import apply_limits, limit_specs

    cfg.check()
    t0 = time.perf_counter()
    lim_specs, limits = limit_specs(list(cfg.cost_at_most or []), list(cfg.at_least or []))
    if limits and cfg.pecan:
        raise CanError(
            "--cost-at-most/--at-least are absolute limits; under --pecan the utilities are β·log-ratios "
            "without absolute units: give relative margins (--constraint/--cost)"
        )
    loaded = load_table(cfg.scores, cfg.reward, cfg.constraint, cfg.cost, cfg.prompt_id, cfg.float32,
                        cfg.drop_bad_rows, cfg.kl if cfg.pecan else None, lim_specs, keep_float32=True)  # fmt: skip
    loaded, limit_block = apply_limits(loaded, limits)
    return certify(loaded, cfg, limit_block, load_s=time.perf_counter() - t0)


def certify(loaded, cfg: DualConfig, limit_block: dict | None = None, load_s: float = 0.0) -> Certificate:
    """The solve and certificate of a loaded table with its margins (`run` after loading; a refine round's
    certificate on its parent's table, at margins given as numbers)."""
    import jax
    import jax.numpy as jnp

    from bridge.bias import bias_block
    from bridge.scores_table import collect_record
    from can_jax import aot
    from can_jax.bias import finite_k_bias_jit
    from can_jax.dual import device_count
    from can_jax.result import Status

    data = data_summary(loaded, cfg.reward, cfg.prompt_id)
    record = collect_record(cfg.scores)
    scorers = record.scorer_block(cfg.reward, loaded.names, loaded.kinds)
    if record.sampling:  # the engine that drew the samples, and its log-probs' distance from log π_ref
        data["sampling"] = record.sampling
    devices = device_count(cfg.devices)
    # The certificate's `devices` block: how many local JAX devices the prompts were sharded over, and which.
    placed = {"count": devices, "platform": jax.local_devices()[0].platform, "processes": jax.process_count()}
    t1 = time.perf_counter()
    result, errs, notes, tol = solve(loaded, cfg.beta, cfg.tol, cfg.max_iter, cfg.se, devices, limit_block)
    t2 = time.perf_counter()
    bias = None
    if cfg.bias and int(result.status) == Status.CONVERGED:  # the finite-K bias block (`can dual --bias`)
        dtype = jnp.dtype(loaded.dtype)
        report = aot.call("finite_k_bias", finite_k_bias_jit, result.x, loaded.for_solve(devices),
                          jnp.asarray(loaded.margins, dtype), cfg.beta, static={"dtype": dtype, "devices": devices})
        bias = bias_block(report, loaded.names)
    t3 = time.perf_counter()
    pecan = None
    if cfg.pecan:
        from bridge.pecan import certificate_block

        pecan = certificate_block(cfg.scores, cfg.reward, loaded.names, cfg.kl, cfg.prompt_id)
    timing = {"load_s": round(load_s, 4), "solve_s": round(time.perf_counter() - t1 - (t3 - t2), 4)}
    if bias is not None:
        timing["bias_s"] = round(t3 - t2, 4)
    return Certificate.build(
        result, loaded.names, loaded.kinds, loaded.margins, cfg.beta, data, standard_errors=errs, tol=tol,
        dtype=str(jnp.dtype(loaded.dtype)), standard_error_notes=notes, bias=bias, limits=limit_block,
        scorers=scorers, pecan=pecan, timing=timing, devices=placed,
    )  # fmt: skip


def margins_at_reach(scores, reward: str, names: list[str], beta: float, fraction: float, ref_columns=None) -> list:
    """`--constraint NAME=MARGIN` texts with each margin `fraction` of the constraint's reach on the samples (the
    most any policy on them can gain): how the demos choose margins."""
    import jax.numpy as jnp

    from can_jax.solve import solve_dual_jit

    probe = load_scores(scores, reward, [ConstraintSpec(n, 0.0) for n in names], ref_columns=ref_columns)
    reach = solve_dual_jit(probe.scores, jnp.zeros(len(names)), beta).reach
    stuck = [f"{n} ({float(r):+.3g})" for n, r in zip(names, reach, strict=True) if not r > 0]
    if stuck:
        raise CanError(f"no policy on these samples improves {', '.join(stuck)} over the reference expectation")
    return [f"{n}={round(float(fraction * r), 4)}" for n, r in zip(names, reach, strict=True)]


def check_solution(scores_path, cert: Certificate) -> float:
    """Re-evaluates the dual at the certificate's λ and β on the table and refuses a λ that is not its solution
    (a hand-edited β or λ): the scaled KKT residual must be within 100× the tolerance the solve reached.
    Returns the residual."""
    import jax.numpy as jnp

    from can_jax.solve import kkt_at

    loaded = load_for(scores_path, cert)
    dtype = loaded.scores.reward.dtype
    lam = jnp.asarray(list(cert.lam.values()), dtype)
    res, floor = kkt_at(loaded.scores, jnp.asarray(loaded.margins, dtype), cert.beta, lam, dtype=jnp.float64)
    reached = max([cert.kkt_tolerance or 0.0, float(np.max(np.asarray(floor))), 1e-9])
    res = float(res)
    if not res <= 100 * reached:
        raise CanError(
            f"the certificate's λ {cert.lam} is not the solution of the dual at its β = {cert.beta:g} on "
            f"{scores_path} (KKT residual {res:.3g}, tolerance {reached:.2g}): was it edited? re-run `can dual`"
        )
    check_predictions(loaded, cert, lam)
    return res


def check_predictions(loaded, cert: Certificate, lam) -> None:
    """Refuses a certificate whose predicted outcome (utility and reward gains, KL) is not what π_λ gives on the
    table at its λ and β: evaluation, refine and the model card compare the trained policy with these numbers, so
    an edited prediction would be a wrong verdict. The tolerance is the solve's precision, in each score's own
    units (a float32 solve of scores near 100 is off by ~1e-5): an edit that matters is far larger."""
    import jax.numpy as jnp

    from can_jax.certify import predicted_outcome
    from can_jax.dual import to_blocks

    sc = loaded.scores
    mask = np.asarray(sc.mask, bool)
    units = {"reward": float(np.max(np.abs(np.asarray(sc.reward)[mask]), initial=0.0)), "KL": 1.0}
    util = np.asarray(sc.utility)[mask]  # [rows, m]
    units.update({n: float(np.max(np.abs(util[:, j]), initial=0.0)) for j, n in enumerate(loaded.names)})
    eps = 1e-6 if cert.dtype == "float32" else 1e-9
    pred = predicted_outcome(jnp.asarray(lam, jnp.float64), to_blocks(sc), jnp.asarray(cert.beta, jnp.float64),
                             centre=True)  # fmt: skip
    predicted = cert.predicted
    given = {**{n: (predicted.get("utility_gains") or {}).get(n) for n in loaded.names},
             "reward": predicted.get("reward_gain"), "KL": predicted.get("kl")}  # fmt: skip
    here = {**dict(zip(loaded.names, np.asarray(pred.utility_gain).tolist(), strict=True)),
            "reward": float(pred.reward_gain), "KL": float(pred.kl)}  # fmt: skip
    for name, value in here.items():
        was = given[name]
        what = f"predicted {name}" + (" gain" if name != "KL" else "")
        if not isinstance(was, (int, float)):
            raise CanError(f"the certificate has no {what}: was it edited? re-run `can dual`")
        if not abs(value - was) <= 1e3 * eps * (1.0 + units[name]) + 1e-4 * abs(value):
            raise CanError(f"the certificate's {what} {was:.6g} is not what its λ gives on {loaded.path} "
                           f"({value:.6g}): was it edited? re-run `can dual`")  # fmt: skip


def data_summary(loaded, reward: str, prompt_id: str) -> dict:
    """The certificate's `data` block for a `bridge.tables.LoadedScores`."""
    k = loaded.columns.counts
    return {
        "path": loaded.path,
        "sha256": loaded.sha256,
        "reward": reward,
        "prompt_id": prompt_id,
        "n_prompts": int(k.size),
        "n_responses": int(k.sum()),
        "n_rows": loaded.n_rows,
        "dropped_rows": loaded.dropped_rows,
        # The bad-row rule `label` must apply to this table: "refused" (none were present) or "dropped".
        "bad_rows": loaded.bad_rows,
        "prompts_with_one_response": int((k < 2).sum()),
        # Where E_ref[g_j | x] came from: a reference column (PeCAN's −β·KL) or the responses' sample mean.
        "reference_expectation": {n: (loaded.ref_columns or {}).get(n, "sample mean") for n in loaded.names},
    }


def solve(loaded, beta: float, tol, max_iter: int, se: bool, devices: int | None = 1, limits: dict | None = None):
    """Solves the dual of a loaded table in its `dtype` over `devices` local devices (None: all of them):
    (DualResult, standard errors or None, their notes, tol used).

    Out-of-reach margins raise `InfeasibleMarginsError` with the one-line diagnosis (never a huge λ); said in limits
    where the constraints were stated as limits (`limits`: the certificate's block, `bridge.limits`).
    """
    import jax.numpy as jnp

    from can_jax.certify import infeasibility_message
    from can_jax.dual import device_count
    from can_jax.errors import InfeasibleMarginsError, InvalidArgumentError
    from can_jax.inference import solve_with_errors, standard_error_notes
    from can_jax.result import Status
    from can_jax.solve import default_tol, solve_dual_jit

    dtype = jnp.dtype(loaded.dtype)
    margins = jnp.asarray(loaded.margins, dtype)
    tol = default_tol(dtype) if tol is None else tol
    from can_jax import aot

    static = {"max_iter": max_iter, "dtype": dtype, "devices": devices}
    data = loaded.for_solve(device_count(devices))  # the packed layout on one CPU device
    if se:
        result, errs = aot.call("solve_with_errors", solve_with_errors, data, margins, beta, tol=tol,
                                static=static)  # fmt: skip
    else:
        result = aot.call("solve_dual", solve_dual_jit, data, margins, beta, tol=tol, static=static)
        errs = None
    if int(result.status) in (Status.INFEASIBLE, Status.DIVERGED):
        from bridge.limits import infeasible_limits_message

        said = infeasible_limits_message(result, loaded.names, loaded.margins, limits or {})
        raise InfeasibleMarginsError(said or infeasibility_message(result, loaded.names, loaded.margins))
    if int(result.status) == Status.INVALID:
        raise InvalidArgumentError(result.message)
    notes = None
    if errs is not None:
        errs = np.asarray(errs)
        notes = standard_error_notes(result, data, errs)
    return result, errs, notes, tol


def sensitivity_at(loaded, cert: Certificate) -> np.ndarray:
    """The dual's Hessian ∇²D̂(λ) at the certificate's λ on its table (`bridge.tables.load_for`), in float64: the
    derivative ∂p/∂λ of the predicted gains, the first sensitivity of `can refine`'s Newton step."""
    import jax.numpy as jnp

    from can_jax.dual import sensitivity

    lam = jnp.asarray([cert.lam[n] for n in cert.names], jnp.float64)
    return np.asarray(sensitivity(lam, loaded.scores, cert.beta)[1], float)


def round_certificate(loaded, parent: Certificate, lam, index: int, path=None, **record) -> Certificate:
    """The certificate of correction round `index` (`can refine`): the dual on the parent's own table (`loaded`, as
    `bridge.tables.load_for` reads it) whose solution is `lam` (the λ the round's step chose), so that `label`
    relabels the same samples under it and re-checks it. With `path` it is written there, or read back from there
    when a resumed run has it already (refused if it belongs to another chain).

    Any λ ≥ 0 solves the dual at the *effective* margins b' = p(λ) for constraints with λ_j > 0 and
    b'_j = min(b_j, p_j(λ)) for the others, where p(λ) are π_λ's predicted gains on the samples. This solves that
    dual (λ comes back to within the solver's tolerance, the gains it predicts are p(λ)) and records the round:
    index, parent hash, the chain's target margins and `record`. Raises CanError if the solve does not converge.
    """
    import jax.numpy as jnp

    from can_jax.dual import sensitivity

    if path is not None and Path(path).is_file():
        cert = Certificate.read(path)
        if cert.parent_sha256 != parent.sha256 or cert.round_index != index:
            raise CanError(f"{path} is not round {index} of this chain (its parent is another certificate): use "
                           "another --out")  # fmt: skip
        return cert
    t0 = time.perf_counter()
    lam = np.maximum(np.asarray(lam, float), 0.0)
    p = np.asarray(sensitivity(jnp.asarray(lam, loaded.scores.reward.dtype), loaded.scores, parent.beta)[0], float)
    targets = parent.target_margins
    eff = np.where(lam > 0, p, np.minimum([targets[n] for n in parent.names], p))
    pecan = parent.pecan
    cfg = DualConfig(scores=loaded.source or loaded.path, reward=parent.reward, beta=parent.beta,
                     prompt_id=parent.prompt_id, float32=parent.dtype == "float32",
                     drop_bad_rows=parent.drops_bad_rows, pecan=pecan is not None,
                     kl=(pecan or {}).get("reference", "token"))  # fmt: skip
    # The margins go to the solve as the numbers they are (a cost's margin is the reduction of its mean, the gain
    # of the negated column: the same number in both); a float32 chain solves in float32 as `can dual` did.
    at = replace(loaded, margins=np.asarray(eff, float), dtype=np.dtype(parent.dtype))
    cert = certify(at, cfg, load_s=time.perf_counter() - t0)
    if not cert.converged:
        raise CanError(f"round {index}: the dual at the round's λ did not converge ({cert.message})")
    cert = cert.with_round(index, parent, requested_lambda=dict(zip(parent.names, lam.tolist(), strict=True)),
                           **record)  # fmt: skip
    if path is not None:
        cert.write(path)
    return cert
