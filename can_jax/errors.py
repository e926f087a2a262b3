"""The error hierarchy: every user-facing failure is a `CanError` with one readable line, and the
`Outcome` a `--json` consumer reads in `status` when a command ends without a solver status."""

import enum


class Outcome(enum.Enum):
    """Every `status` string `--json` output and certificates carry, in one place so scripts can rely on the set: the
    solver's (`can_jax.result.Status.label` is the member of the same name) and a command's own when it ends without
    a solve. An argument refused, or margins found out of reach, before a solve read as the solver's own words."""

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    INFEASIBLE = "infeasible"
    PRECISION = "precision"
    NONFINITE = "nonfinite"
    DIVERGED = "diverged"
    INVALID = "invalid"
    RUNNING = "running"
    OK = "ok"
    USAGE_ERROR = "usage_error"
    BAD_INPUT = "bad_input"
    OUTPUT_ERROR = "output_error"
    ERROR = "error"


class CanError(Exception):
    """Base class: the CLI prints `str(err)` as one line on stderr and exits non-zero; `outcome` is its --json
    `status`."""

    outcome = Outcome.ERROR


class ScoresFormatError(CanError):
    """A scores table or array set that cannot be used: missing columns, NaN/inf values, bad shapes."""

    outcome = Outcome.BAD_INPUT


class InfeasibleMarginsError(CanError):
    """The margins ask for more improvement than any policy supported on the samples can reach (DESIGN §2)."""

    outcome = Outcome.INFEASIBLE


class DegenerateDataError(CanError):
    """The samples carry no information about changing the policy (e.g. one response per prompt everywhere)."""


class InvalidArgumentError(CanError, ValueError):
    """An argument that cannot be used, caught where it is concrete (β ≤ 0, NaN margins, a bad tolerance)."""

    outcome = Outcome.INVALID


class OutputError(CanError):
    """An output file could not be written (a directory in the way, a read-only disk, no space)."""

    outcome = Outcome.OUTPUT_ERROR


def at_least_one(*named) -> None:
    """CanError for the first (option, value) below 1."""
    for name, value in named:
        if value < 1:
            raise CanError(f"{name} must be at least 1, got {value}")
