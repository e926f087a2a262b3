"""The reports the model stages write, each owned here like the certificate and the preference set (DESIGN §8): the
evaluation report (`OUT/evaluation.json`, `EvaluationReport`), the refine record (`OUT/refine.json`,
`RefineRecord`) and the rounds table (`OUT/rounds.json`, `RoundsReport`).

Each carries a format name and version; its reader validates and refuses an unknown version in one line, its
writer writes atomically, and other modules read it through properties. Files written before the versions
existed (no `format` key) read as version 0.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bridge.files import atomic_write_text
from can_jax.errors import CanError


def cell(x, spec: str = "+.3f") -> str:
    """A number in a report's table: "—" where there is none."""
    return "—" if x is None else format(x, spec)


def _read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CanError(f"{what} not found: {path}") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CanError(f"{path}: not a readable {what} ({err})") from None
    if not isinstance(body, dict):
        raise CanError(f"{path}: not a {what} (a JSON object)")
    return body


def _versioned(body: dict, fmt: str, version: int, what: str, where) -> dict:
    """The body of a `fmt` file, checked: another format or a version this code does not know is refused."""
    given = body.get("format", fmt)
    found = body.get("format_version", 0)
    if given != fmt:
        raise CanError(f"{where}: a {given!r} file, not a {what}")
    if not isinstance(found, int) or not 0 <= found <= version:
        raise CanError(f"{where}: {what} format version {found!r} is not supported (this can reads versions up to "
                       f"{version}): update can")  # fmt: skip
    return body


def _field(key: str, required: bool = True) -> property:
    """A report's plain (immutable) body value as a read-only property; `required` False reads None when absent."""
    return property(lambda self: self._body[key] if required else self._body.get(key))


class _Report:
    """A JSON report: a validated body, an atomic writer, its format stamped on write."""

    FORMAT = ""
    VERSION = 1
    WHAT = ""

    def __init__(self, body: dict, where: str = "the report"):
        self._body = _versioned(dict(body), self.FORMAT, self.VERSION, self.WHAT, where)

    @classmethod
    def read(cls, path: str | os.PathLike):
        return cls(_read_json(path, cls.WHAT), str(path))

    def to_dict(self) -> dict:
        return {**copy.deepcopy(self._body), "format": self.FORMAT, "format_version": self.VERSION}

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def format_version(self) -> int:
        return self._body.get("format_version", 0)


@dataclass(frozen=True)
class GainRow:
    """One scorer's line of an evaluation: the certificate's prediction beside the achieved gain on held-out prompts
    (with its paired 95% interval over prompts) and the gain on the training samples."""

    name: str
    achieved_gain: float
    ci95: tuple[float, float]
    role: str = ""
    predicted_gain: float | None = None
    standard_error: float = float("nan")  # reports written before it was recorded lack it
    margin: float | None = None
    reference_mean: float = float("nan")
    insample_gain: float | None = None

    @classmethod
    def from_dict(cls, row: dict) -> GainRow:
        """A row as `as_dict` wrote it (in a report, or in a study's own results)."""
        return cls(**{**row, "ci95": tuple(row["ci95"])})

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ci95": list(self.ci95)}


class EvaluationReport(_Report):
    """`can evaluate`'s report: achieved vs predicted gains of an aligned policy, its text check and examples."""

    FORMAT = "can.evaluation"
    WHAT = "evaluation report"

    def __init__(self, body: dict, where: str = "the evaluation report"):
        super().__init__(body, where)
        try:
            self._rows = tuple(GainRow.from_dict(r) for r in self._body["rows"])
        except (KeyError, TypeError) as err:
            raise CanError(f"{where}: its rows are not gain rows ({err})") from None

    @classmethod
    def build(cls, *, aligned: str, reference: str, prompts: int, samples_per_prompt: int, beta: float, lam: dict,
              rows: list[GainRow], text: dict | None, identical_samples: float, note: str | None,
              examples: list) -> EvaluationReport:  # fmt: skip
        return cls({"aligned": aligned, "reference": reference, "prompts": prompts,
                    "samples_per_prompt": samples_per_prompt, "beta": beta, "lambda": dict(lam),
                    "rows": [r.as_dict() for r in rows], "text": text, "identical_samples": identical_samples,
                    "note": note, "examples": list(examples), "format_version": cls.VERSION})  # fmt: skip

    def with_seconds(self, seconds: dict) -> EvaluationReport:
        """The report with the stage times of the run that made it (the demo's)."""
        return EvaluationReport({**self._body, "seconds": dict(seconds)})

    @property
    def rows(self) -> tuple[GainRow, ...]:
        return self._rows

    def row(self, name: str) -> GainRow:
        for r in self._rows:
            if r.name == name:
                return r
        raise CanError(f"the evaluation has no row {name!r} (it has {[r.name for r in self._rows]})")

    def gains(self, names: list[str], level: float) -> dict:
        """The named rows' achieved gains a [m], standard errors [m] and half-widths of their simultaneous intervals
        at joint `level` (Student t over prompts, Bonferroni over the m names): what `can refine` steers by."""
        import numpy as np
        from scipy.stats import t

        from can_jax.refine import simultaneous_level

        a = np.array([self.row(n).achieved_gain for n in names], float)
        se = np.array([self.row(n).standard_error for n in names], float)
        q = float(t.ppf(0.5 + simultaneous_level(len(names), level) / 2, self.prompts - 1))
        return {"gain": a, "se": se, "half_width": q * se}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._rows]

    aligned = _field("aligned")  # str
    reference = _field("reference")  # str
    prompts = _field("prompts")  # int
    samples_per_prompt = _field("samples_per_prompt")  # int
    beta = _field("beta")  # float

    @property
    def lam(self) -> dict:
        return dict(self._body["lambda"])

    @property
    def text(self) -> dict | None:
        return copy.deepcopy(self._body.get("text"))

    identical_samples = _field("identical_samples")  # float
    note = _field("note", required=False)  # str | None

    @property
    def examples(self) -> list[dict]:
        return copy.deepcopy(self._body.get("examples", []))

    @property
    def seconds(self) -> dict | None:
        return copy.deepcopy(self._body.get("seconds"))


class RefineRecord(_Report):
    """`OUT/refine.json`: the chain and settings a refine run's rounds belong to (its round-0 certificate and scores
    table by hash, the policy, the settings with the calibration and test prompts by hash)."""

    FORMAT = "can.refine-record"
    WHAT = "refine record"

    @classmethod
    def build(cls, *, root_sha256: str, scores_sha256: str, policy: str, settings: dict) -> RefineRecord:
        return cls({"root_sha256": root_sha256, "scores_sha256": scores_sha256, "policy": policy,
                    "settings": json.loads(json.dumps(settings, default=str)),
                    "format_version": cls.VERSION})  # fmt: skip

    def __init__(self, body: dict, where: str = "the refine record"):
        super().__init__(body, where)
        if not isinstance(self._body.get("settings", {}), dict):
            raise CanError(f"{where}: not a refine record (its settings are not an object)")

    root_sha256 = _field("root_sha256", required=False)  # str | None
    scores_sha256 = _field("scores_sha256", required=False)  # str | None
    policy = _field("policy", required=False)  # str | None

    @property
    def settings(self) -> dict:
        return copy.deepcopy(self._body.get("settings", {}))


class RoundsReport(_Report):
    """`OUT/rounds.json`: one row per round (λ, the gains predicted, on the training samples, on the calibration
    prompts with their half-width, held out with their interval; the reward, the KL, the stop verdict), the
    constraint names and margins, whether the rule stopped, and the run's settings."""

    FORMAT = "can.rounds"
    WHAT = "rounds report"

    @classmethod
    def build(cls, *, rounds: list[dict], stopped: bool | None, names: list[str], margins: list[float], out: str,
              settings: dict) -> RoundsReport:  # fmt: skip
        return cls({"rounds": copy.deepcopy(rounds), "stopped": stopped, "names": list(names),
                    "margins": [float(b) for b in margins], "out": out, "settings": copy.deepcopy(settings),
                    "format_version": cls.VERSION})  # fmt: skip

    def with_seconds(self, seconds: float) -> RoundsReport:
        return RoundsReport({**self._body, "seconds": seconds})

    @property
    def rounds(self) -> list[dict]:
        return copy.deepcopy(self._body["rounds"])

    stopped = _field("stopped", required=False)  # bool | None

    @property
    def names(self) -> list[str]:
        return list(self._body["names"])

    @property
    def margins(self) -> list[float]:
        return list(self._body["margins"])

    out = _field("out")  # str

    @property
    def settings(self) -> dict:
        return copy.deepcopy(self._body.get("settings", {}))

    seconds = _field("seconds", required=False)  # float | None
