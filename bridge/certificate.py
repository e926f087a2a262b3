"""The dual certificate ② as an artifact (DESIGN: formats): everything a GPU job needs to trust and reproduce λ*.

`Certificate` is the one owner of the certificate's JSON: `Certificate.build` makes it from a solved dual (the CLI,
the demos and correction rounds all call it), `Certificate.read` validates a file, `write`/`write_checked` write
it atomically, and every other module reads it through its properties — never through its keys. Its `sha256`
(of the canonical JSON) is how a preference set and an aligned policy refer to it.

Versions: 1 lacked the `scorers`, `limits`, `round` and `bias` blocks (read with them empty); 2 is written now.
A version this can does not know is refused in one line.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bridge.files import atomic_write_text
from bridge.reports import cell
from bridge.tables import printable
from can_jax.errors import CanError
from can_jax.result import Status

_FORMAT = "can.dual-certificate"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FILE_NAME = "certificate.json"  # its name beside a preference set's data or an aligned policy's weights


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
    tol = cert.get("tolerance")
    loose = [c["name"] for c in cert["constraints"] if tol and (c.get("kkt_tolerance") or 0) > 1.5 * tol]
    if loose:
        notes.append(
            f"the data's floating-point precision limits the KKT residual of {', '.join(map(repr, loose))} to "
            f"{max(c['kkt_tolerance'] for c in cert['constraints']):.2g} (large offsets or a tiny β relative to the "
            "scores): λ* is as exact as the stored scores allow"
        )
    cond = cert.get("hessian_condition")
    if cond is None or cond > COND_WARN:
        if any(c["active"] for c in cert["constraints"]):
            notes.append("the dual is ill-conditioned on the active constraints: λ* is poorly determined")
    return notes


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sha256_of(body: dict) -> str:
    """SHA-256 of a certificate body's canonical JSON (sorted keys): what preference sets and policies refer to."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True, eq=False)
class Certificate:
    """A validated dual certificate. Build one with `Certificate.build`, read one with `Certificate.read`; its
    blocks are read through the properties below (copies: the certificate itself never changes)."""

    _body: dict = field(repr=False)

    # -- making, reading, writing ---------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        result,
        names: list[str],
        kinds: list[str],
        margins,
        beta: float,
        data: dict,
        standard_errors=None,
        tol: float | None = None,
        dtype: str = "float64",
        standard_error_notes: list | None = None,
        *,
        bias: dict | None = None,
        limits: dict | None = None,
        scorers: dict | None = None,
        pecan: dict | None = None,
        round: dict | None = None,
        timing: dict | None = None,
        devices: dict | None = None,
    ) -> Certificate:
        """The certificate of one solved dual; `result` is a (non-vmapped) `DualResult`.

        A standard error that is undefined (or not computed) is null, with `standard_error_note` saying why.
        Optional blocks: `bias` (`bridge.bias.bias_block`, its warnings join the diagnostics), `limits`
        (`bridge.limits`), `scorers` (`CollectRecord.scorer_block`), `pecan` (`bridge.pecan.certificate_block`),
        `round` (a correction round's index and parent hash), `timing` and `devices`.
        """
        from can_jax import __version__

        lam = np.asarray(result.x, float)
        grad = np.asarray(result.jac, float)
        reach = np.asarray(result.reach, float)
        gains = np.asarray(result.predicted.utility_gain, float)
        se = np.full(len(names), np.nan) if standard_errors is None else np.asarray(standard_errors, float)
        if standard_errors is None:
            notes = ["not computed"] * len(names)
        else:
            notes = list(standard_error_notes or [None] * len(names))
        tol_reached = np.broadcast_to(np.asarray(result.tol, float), (len(names),))
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
                "kkt_tolerance": tol_reached[j],
            }
            if not np.isfinite(se[j]):
                entry["standard_error_note"] = notes[j] or "undefined"
            if kinds[j] == "cost":
                entry["predicted_cost_change"] = -gains[j]
            constraints.append(entry)
        body = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            "can_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "beta": float(beta),
            "lambda": {n: lam[j] for j, n in enumerate(names)},
            "margins": {n: float(margins[j]) for j, n in enumerate(names)},
            "constraints": constraints,
            "status": status.label,
            "status_code": int(status),
            "converged": status == Status.CONVERGED,
            "message": status.message,
            "iterations": int(result.nit),
            "function_evaluations": int(result.nfev),
            "kkt_residual": float(result.kkt_residual),
            "tolerance": tol,
            "dual_value": float(result.fun),
            "recession_slope": float(result.slope),
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
            "scorers": {},
            "limits": {},
            "round": {"index": 0, "parent_sha256": None},
            "bias": None,
        }
        if bias is not None:
            body["bias"] = bias
        if limits:
            body["limits"] = limits
        if scorers:
            body["scorers"] = scorers
        if round is not None:
            body["round"] = round
        body["diagnostics"] = diagnose(body) + (list(bias.get("warnings", [])) if bias else [])
        if pecan is not None:
            body["pecan"] = pecan
        if timing is not None:
            body["timing"] = timing
        if devices is not None:
            body["devices"] = devices
        return cls.from_dict(_clean(body), require_converged=False)

    @classmethod
    def from_dict(cls, body: dict, where: str = "certificate", require_converged: bool = True) -> Certificate:
        """Checks a certificate body (format, version, β, constraints, λ, margins, data block) and wraps it."""
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            raise CanError(f"{where} is not a can dual certificate")
        if body.get("format_version") not in READABLE_VERSIONS:
            raise CanError(
                f"{where}: certificate format version {printable(body.get('format_version'), 20)} is not supported "
                f"(this can reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        if body["format_version"] == 1:  # read as version 2: the blocks version 1 did not have, empty
            body = {**body, "scorers": {}, "limits": {}, "round": {"index": 0, "parent_sha256": None}, "bias": None}
        if require_converged and body.get("converged") is not True:
            raise CanError(f"{where}: the dual solve did not converge ({printable(body.get('message'))})")
        if require_converged and body.get("status") != Status.CONVERGED.label:
            raise CanError(f"{where}: status {printable(body.get('status'), 30)!r} is not 'converged' (was it edited?)")
        return cls(_validate(copy.deepcopy(body), where))

    @classmethod
    def read(cls, path: str | os.PathLike, require_converged: bool = True) -> Certificate:
        """Reads and checks a certificate file; refuses one that did not converge unless told otherwise."""
        path = Path(path)
        if path.is_dir():
            raise CanError(f"{path} is a directory, not a certificate")
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise CanError(f"certificate not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            raise CanError(f"{path} is not a JSON certificate: {printable(err)}") from None
        except OSError as err:
            raise CanError(f"cannot read {path}: {printable(err.strerror or err)}") from None
        return cls.from_dict(body, str(path), require_converged)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._body)

    def with_round(self, index: int, parent: Certificate, **record) -> Certificate:
        """This certificate as round `index` of a correction run (`can refine`) whose previous round is `parent`:
        the `round` block holds the index, the parent's hash, the margins the rounds aim at (round 0's), and
        `record` (the step taken and the measurements it was taken from)."""
        targets = parent.target_margins
        if sorted(targets) != sorted(self.names):
            raise CanError(f"round {index}: constraints {self.names} differ from the parent certificate's "
                           f"{sorted(targets)}")  # fmt: skip
        body = self.to_dict()
        body["round"] = _clean({"index": int(index), "parent_sha256": parent.sha256, "target_margins": targets,
                                "root_sha256": parent.root_sha256, **record})  # fmt: skip
        return Certificate.from_dict(body, require_converged=False)

    def to_json(self) -> str:
        return json.dumps(self._body, indent=2) + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.to_json())

    def write_checked(self, path: str | os.PathLike) -> Path:
        """Writes a converged certificate to PATH; any other goes beside it (`failed_path`), so a good certificate
        already at PATH is never replaced by a failed solve. Returns the path written."""
        return self.write(Path(path) if self.converged else failed_path(path))

    @property
    def sha256(self) -> str:
        return sha256_of(self._body)

    # -- what the stages read -------------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return float(self._body["beta"])

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self._body["constraints"]]

    @property
    def kinds(self) -> list[str]:
        return [c["kind"] for c in self._body["constraints"]]

    @property
    def lam(self) -> dict[str, float]:
        """λ* by constraint name."""
        return {c["name"]: float(c["lambda"]) for c in self._body["constraints"]}

    def score_weights(self) -> list[tuple[str, float]]:
        """[(reward, 1), (constraint, λ_j · sign_j), …]: the signed score s = r + λᵀg is Σ weight · column, with a
        cost column read negated as `can dual` read it (`bridge.tables.sign_of`). The one place labels, pair
        relabelling and evaluation take s from."""
        from bridge.tables import sign_of

        return [(self.reward, 1.0)] + [(c["name"], float(c["lambda"]) * sign_of(c["kind"]))
                                       for c in self._body["constraints"]]  # fmt: skip

    @property
    def margins(self) -> dict[str, float]:
        return {c["name"]: float(c["margin"]) for c in self._body["constraints"]}

    @property
    def predicted(self) -> dict:
        """reward_gain, utility_gains (by name), kl, ess_fraction of π_λ* on the samples."""
        return copy.deepcopy(self._body["predicted"])

    @property
    def predicted_gains(self) -> dict[str, float]:
        return dict(self._body["predicted"]["utility_gains"])

    @property
    def predicted_reward_gain(self) -> float:
        return self._body["predicted"]["reward_gain"]

    @property
    def reward(self) -> str:
        """The reward column of the scores table."""
        return self._body["data"]["reward"]

    @property
    def prompt_id(self) -> str:
        return self._body["data"]["prompt_id"]

    @property
    def scores_sha256(self) -> str | None:
        return self._body["data"].get("sha256")

    @property
    def drops_bad_rows(self) -> bool:
        """Whether `can dual --drop-bad-rows` made it (the rule `label` must apply again)."""
        return self._body["data"].get("bad_rows") == "dropped"

    @property
    def reference_columns(self) -> dict[str, str]:
        """Constraint → the column that gave E_ref[g | x] (PeCAN's −β·KL); constraints using the sample mean are
        left out."""
        refs = self._body["data"].get("reference_expectation") or {}
        return {n: col for n, col in refs.items() if col != "sample mean"}

    @property
    def data(self) -> dict:
        """The data summary: path, sha256, columns, n_prompts, n_responses, …"""
        return copy.deepcopy(self._body["data"])

    @property
    def converged(self) -> bool:
        return self._body.get("converged") is True

    @property
    def status(self) -> str:
        return self._body["status"]

    @property
    def message(self) -> str:
        return self._body.get("message", "")

    @property
    def kkt_residual(self) -> float:
        return self._body["kkt_residual"]

    @property
    def kkt_tolerance(self) -> float | None:
        """The largest KKT tolerance the solve reached over the constraints (None if none is recorded)."""
        reached = [float(c["kkt_tolerance"]) for c in self._body["constraints"] if _number(c.get("kkt_tolerance"))]
        return max(reached) if reached else None

    @property
    def limits(self) -> dict:
        return copy.deepcopy(self._body.get("limits") or {})

    @property
    def scorers(self) -> dict:
        return copy.deepcopy(self._body.get("scorers") or {})

    @property
    def pecan(self) -> dict | None:
        return copy.deepcopy(self._body.get("pecan"))

    @property
    def bias(self) -> dict | None:
        return copy.deepcopy(self._body.get("bias"))

    @property
    def round(self) -> dict:
        return copy.deepcopy(self._body.get("round") or {"index": 0, "parent_sha256": None})

    @property
    def dtype(self) -> str:
        """The precision the dual was solved in ("float64" or "float32")."""
        return self._body.get("dtype", "float64")

    @property
    def round_index(self) -> int:
        """0 for a one-shot certificate, n for correction round n (`can refine`)."""
        return int(self.round.get("index") or 0)

    @property
    def parent_sha256(self) -> str | None:
        """The hash of the previous round's certificate (None for round 0)."""
        return self.round.get("parent_sha256")

    @property
    def target_margins(self) -> dict[str, float]:
        """The margins a chain of correction rounds aims at: round 0's (a round certificate's own margins are the
        effective ones whose dual solution is its λ)."""
        return dict(self.round.get("target_margins") or self.margins)

    @property
    def root_sha256(self) -> str:
        """The hash of the chain's round-0 certificate (this one's own for round 0)."""
        return self.round.get("root_sha256") or self.sha256

    @property
    def diagnostics(self) -> list[str]:
        return list(self._body.get("diagnostics", []))

    def summary(self) -> tuple[list[list[str]], list[str], list[str]]:
        """What `can dual` prints: (rows of constraint, kind, margin, λ*, s.e., active, predicted gain, reach as
        text; summary lines; warnings)."""

        from bridge.limits import limit_lines, limit_text

        b = self._body
        limits = b.get("limits") or {}

        def margin(c):  # a limit as the user stated it, the margin it implies beside it
            lim = limits.get(c["name"])
            return f"{limit_text(c['name'], lim)} (b {cell(c['margin'], '.6g')})" if lim else cell(c["margin"], ".6g")

        rows = [[c["name"], c["kind"], margin(c), cell(c["lambda"], ".6g"), cell(c["standard_error"], ".2g"),
                 "yes" if c["active"] else "no", cell(c["predicted_gain"], ".6g"), cell(c["reach"], ".6g")]
                for c in b["constraints"]]  # fmt: skip
        p, d = b["predicted"], b["data"]
        lines = [
            f"status: {b['status']} — {b['message']}",
            f"β = {b['beta']:g}; {b['iterations']} Newton iterations ({b['function_evaluations']} passes), KKT "
            f"residual {b['kkt_residual']:.2e}; Hessian on the active set: least eigenvalue "
            f"{cell(b['min_hessian_eig'], '.3g')}, condition {cell(b['hessian_condition'], '.3g')}",
            f"predicted for π_λ*: reward gain {p['reward_gain']:+.4g}, KL(π‖π_ref) {p['kl']:.4g} nats, effective "
            f"sample fraction {p['ess_fraction']:.3f}",
            f"data: {d['n_prompts']} prompts, {d['n_responses']} responses"
            + (f", {d['dropped_rows']} bad rows dropped" if d.get("dropped_rows") else ""),
            *limit_lines(limits),
        ]
        if "pecan" in b:
            lines.append(f"PeCAN: E_ref[g̃ | x] from the {b['pecan']['reference']} KL estimate")
            for name, row in b["pecan"]["kl"].items():
                lines.append(
                    f"  KL(π_ref ‖ π_{name}) per prompt: token-level {row['token']:.4g} (± {row['token_se']:.2g}), "
                    f"sample mean {row['sample']:.4g} (± {row['sample_se']:.2g}), correlation "
                    f"{row['correlation']:.2f}"
                )
        return rows, lines, self.diagnostics

    def markdown(self) -> list[str]:
        """Markdown lines for a model card: reward, status, and per constraint its kind, margin, limit, λ* and
        predicted gain; then the predicted reward gain and KL."""
        b = self._body
        lines = [f"- reward: `{b['data'].get('reward')}`; dual status: {b.get('status')} (KKT residual "
                 f"{b.get('kkt_residual')})", "", "| constraint | kind | margin | limit | λ* | predicted gain |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        from bridge.limits import limit_text

        limits = b.get("limits") or {}
        for c in b["constraints"]:
            lim = limits.get(c["name"])
            lim_text = "—" if not lim else limit_text(c["name"], lim)
            lines.append(f"| {c['name']} | {c['kind']} | {c['margin']:+.4g} | {lim_text} | {c['lambda']:.4g} | "
                         f"{c['predicted_gain']:+.4g} |")  # fmt: skip
        pred = b.get("predicted", {})
        lines += ["", f"Predicted reward gain {pred.get('reward_gain')}, KL(π‖π_ref) {pred.get('kl')} (on the "
                  f"samples the dual saw). `{FILE_NAME}` beside the weights is the full dual certificate.",
                  ""]  # fmt: skip
        return lines


def write_beside(folder: str | os.PathLike, cert: Certificate) -> Path:
    """The certificate as `certificate.json` in a folder (an aligned policy's, a preference set's)."""
    return cert.write(Path(folder) / FILE_NAME)


def read_beside(folder: str | os.PathLike) -> Certificate | None:
    """The certificate an aligned policy folder carries (`can train` writes it beside the weights); None when the
    folder has none (a policy trained elsewhere)."""
    path = Path(folder) / FILE_NAME
    return Certificate.read(path) if path.is_file() else None


def failed_path(path: str | os.PathLike) -> Path:
    """Where an unconverged certificate goes instead of PATH: cert.json → cert.failed.json."""
    path = Path(path)
    return path.with_name(f"{path.stem}.failed{path.suffix or '.json'}")


def _validate(cert, where: str = "certificate") -> dict:
    """Checks what `label` relies on: β > 0 and finite; each constraint named once, of a known kind,
    with a finite margin and a finite λ ≥ 0; the top-level λ and margin maps equal the constraints' own; the data
    block names the reward and prompt-id columns. One line per problem, naming the field."""
    if not isinstance(cert, dict):
        raise CanError(f"{where} is not a can dual certificate")
    beta = cert.get("beta")
    if not (_number(beta) and beta > 0):
        raise CanError(f"{where}: beta must be a positive finite number, found {beta!r}")
    constraints = cert.get("constraints")
    if not isinstance(constraints, list) or not all(isinstance(c, dict) for c in constraints):
        raise CanError(f"{where}: 'constraints' must be a list of constraint entries")
    names = []
    for c in constraints:
        name = c.get("name")
        if not isinstance(name, str) or not name:
            raise CanError(f"{where}: a constraint has no name")
        if c.get("kind") not in ("utility", "cost"):
            raise CanError(f"{where}: constraint {name!r} has kind {c.get('kind')!r}, not 'utility' or 'cost'")
        if not (_number(c.get("lambda")) and c["lambda"] >= 0):
            raise CanError(f"{where}: constraint {name!r} has lambda {c.get('lambda')!r}; λ must be finite and ≥ 0")
        if not _number(c.get("margin")):
            raise CanError(f"{where}: constraint {name!r} has margin {c.get('margin')!r}; it must be finite")
        names.append(name)
    if len(set(names)) != len(names):
        raise CanError(f"{where}: a constraint is named twice: {names}")
    lam = cert.get("lambda")
    if not isinstance(lam, dict) or set(lam) != set(names):
        raise CanError(f"{where}: the 'lambda' map names {sorted(lam) if isinstance(lam, dict) else lam!r}, the "
                       f"constraints {sorted(names)}: they disagree")  # fmt: skip
    for c in constraints:
        if lam[c["name"]] != c["lambda"]:
            raise CanError(f"{where}: λ of {c['name']!r} is {lam[c['name']]!r} in 'lambda' but {c['lambda']!r} in "
                           "'constraints': they disagree (was the file edited?)")  # fmt: skip
    margins = cert.get("margins")
    if isinstance(margins, dict) and any(margins.get(c["name"]) != c["margin"] for c in constraints):
        raise CanError(f"{where}: the 'margins' map and the constraints' margins disagree")
    data = cert.get("data")
    if not isinstance(data, dict):
        raise CanError(f"{where}: no 'data' block")
    for key in ("reward", "prompt_id"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise CanError(f"{where}: data.{key} must name a column, found {data.get(key)!r}")
    return cert
