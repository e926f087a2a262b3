"""One outcome vocabulary: the solver's `Status` carries its message and label, the CLI's other `--json` statuses
are the `Outcome` enumeration, and every error class is one that something raises."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp

from can_jax import errors
from can_jax.errors import CanError, Outcome
from can_jax.result import Status

ROOT = Path(__file__).resolve().parents[2]

# The codes are in every certificate (`status_code`) and compared as ints under jit: they never change.
CODES = {"CONVERGED": 0, "MAX_ITER": 1, "INFEASIBLE": 2, "PRECISION": 3, "NONFINITE": 4, "DIVERGED": 5,
         "INVALID": 6, "RUNNING": -1}  # fmt: skip


def test_every_status_has_its_code_a_message_and_a_distinct_label():
    assert {s.name: int(s) for s in Status} == CODES
    for s in Status:
        assert isinstance(s.message, str) and s.message.strip(), s
        assert s.label == s.name.lower()  # what users' scripts read (the certificate's `status`)
        assert Outcome[s.name].value == s.label  # one vocabulary: every status string is an Outcome
        assert Status(int(s)) is s and Status(int(s)).name.lower() == s.label
    labels = [s.label for s in Status]
    assert len(set(labels)) == len(labels)
    assert len({s.message for s in Status}) == len(Status)


def test_status_compares_as_an_int_under_jit():
    @jax.jit
    def converged(code):
        return code == Status.CONVERGED

    assert bool(converged(jnp.int32(0))) and not bool(converged(jnp.int32(int(Status.INFEASIBLE))))
    assert int(jnp.asarray(Status.PRECISION)) == 3


def test_outcomes_are_distinct_and_share_only_same_named_solver_labels():
    """A `--json` consumer sees one string per meaning: an outcome that spells a solver label is the same verdict
    (margins out of reach, an argument refused), never a different one under the same word."""
    values = [o.value for o in Outcome]
    assert len(set(values)) == len(values) and all(v and v == v.lower() for v in values)
    labels = {s.label: s for s in Status}
    for o in Outcome:
        if o.value in labels:
            assert labels[o.value].name == o.name, o


def test_each_error_class_carries_an_outcome():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, CanError)]
    assert len(classes) >= 2
    for cls in classes:
        assert isinstance(cls.outcome, Outcome), cls
    assert errors.ScoresFormatError.outcome is Outcome.BAD_INPUT
    assert errors.InfeasibleMarginsError.outcome is Outcome.INFEASIBLE
    assert errors.InvalidArgumentError.outcome is Outcome.INVALID
    assert errors.OutputError.outcome is Outcome.OUTPUT_ERROR
    assert errors.DegenerateDataError.outcome is CanError.outcome is Outcome.ERROR


def _raised_names(source: str) -> set[str]:
    """Names of the classes a module's `raise` statements construct (`raise X(...)`, `raise X`)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                names.add(exc.id)
            elif isinstance(exc, ast.Attribute):
                names.add(exc.attr)
    return names


def test_scanner_sees_a_raise():
    assert _raised_names("raise A('x')\nraise m.B\nraise C from None\n") == {"A", "B", "C"}


def test_every_error_subclass_is_raised_somewhere():
    """An error class nothing raises is a promise the code does not keep (a consumer would catch it in vain)."""
    paths = [path for package in ("can_jax", "bridge", "train") for path in (ROOT / package).rglob("*.py")]
    assert len(paths) > 20
    raised = set().union(*(_raised_names(path.read_text()) for path in paths))
    subclasses = [c.__name__ for c in vars(errors).values()
                  if isinstance(c, type) and issubclass(c, CanError) and c is not CanError]  # fmt: skip
    assert subclasses and not [name for name in subclasses if name not in raised]
