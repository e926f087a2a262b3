"""The CLI's outcome vocabulary: every `--json` status of `can dual` and `can sweep` is a solver label
(`Status.label`) or an `Outcome`, written from the enumerations and never as a bare string; every exit code is an
`ExitCode`, and the README's troubleshooting table lists each one."""

import ast
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from can_jax.errors import Outcome
from can_jax.result import Status
from train.cli import app
from train.cli.app import ExitCode, fail

ROOT = Path(__file__).resolve().parents[2]
# The modules that write `--json` statuses and exit codes (the certificate's `status` included).
SOURCES = ["train/cli/app.py", "train/cli/dual.py", "train/cli/launch.py", "train/cli/stability.py",
           "bridge/certificate.py"]
EXITS = {"Exit", "exit", "_exit"}


def _bare_statuses(source: str) -> list[int]:
    """Lines where a status is a string literal: {"status": "…"}, x["status"] = "…", status="…" (an argument or a
    parameter's default)."""
    lines = []

    def text(node) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, str)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            lines += [v.lineno for k, v in zip(node.keys, node.values) if text(k) and k.value == "status" and text(v)]
        elif isinstance(node, ast.Assign) and text(node.value):
            for t in node.targets:
                if isinstance(t, ast.Subscript) and text(t.slice) and t.slice.value == "status":
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call):
            lines += [kw.value.lineno for kw in node.keywords if kw.arg == "status" and text(kw.value)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args
            defaults = dict(zip(reversed(args), reversed(node.args.defaults)))
            defaults.update({a: d for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None})
            lines += [d.lineno for a, d in defaults.items() if a.arg == "status" and text(d)]
    return lines


def _bare_exit_codes(source: str) -> list[int]:
    """Lines where an exit code is a number: typer.Exit(1), sys.exit(3), fail(…, code=1), a parameter `code=1`,
    `return 1` in a function that returns an exit code (its name says so, or it is the launcher's `_launch`)."""
    lines = []

    def number(node) -> bool:
        return isinstance(node, ast.Constant) and type(node.value) is int

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in EXITS and node.args and number(node.args[0]):
                lines.append(node.lineno)
            lines += [kw.value.lineno for kw in node.keywords if kw.arg == "code" and number(kw.value)]
        elif isinstance(node, ast.FunctionDef):
            args = node.args.posonlyargs + node.args.args
            lines += [d.lineno for a, d in zip(reversed(args), reversed(node.args.defaults)) if a.arg == "code"
                      and number(d)]  # fmt: skip
            if "exit" in node.name or node.name == "_launch":
                lines += [r.lineno for r in ast.walk(node) if isinstance(r, ast.Return) and r.value and number(r.value)]
    return lines


def test_scanners_see_bare_strings_and_numbers():
    """A scan that cannot fail is no test: each form it looks for is found in a snippet that has it."""
    snippet = ('echo({"status": "ok"})\nd["status"] = "x"\nfail("m", status="invalid")\n'
               'def f(status="error"): pass\ndef g(*, status="error"): pass\n'
               'echo({"status": Outcome.OK.value})\nfail("m", status=Outcome.INVALID)\n')  # fmt: skip
    assert sorted(_bare_statuses(snippet)) == [1, 2, 3, 4, 5]
    snippet = ("raise typer.Exit(3)\nsys.exit(1)\nfail('m', code=1)\ndef _exit_code(c):\n    return 0\n"
               "def _launch():\n    return 1\nraise typer.Exit(int(ExitCode.OK))\n"
               "def fail(m, code=1): pass\n")  # fmt: skip
    assert sorted(_bare_exit_codes(snippet)) == [1, 2, 3, 5, 7, 9]


@pytest.mark.parametrize("path", SOURCES)
def test_statuses_and_exit_codes_come_from_the_enumerations(path):
    source = (ROOT / path).read_text()
    assert not _bare_statuses(source), f"{path}: a bare status string on lines {_bare_statuses(source)}"
    assert not _bare_exit_codes(source), f"{path}: a bare exit code on lines {_bare_exit_codes(source)}"


def test_fail_refuses_a_status_outside_the_enumeration():
    """Modules that still pass a string (`status="invalid"`) are checked where it is printed."""
    with pytest.raises(ValueError):
        fail("m", json_out=True, status="not_a_status")


def _json(res) -> dict:
    return json.loads(res.stdout)


def test_json_failures_print_outcomes_and_their_exit_codes(tmp_path):
    runner = CliRunner()
    known = {o.value for o in Outcome} | {s.label for s in Status}
    usage = runner.invoke(app, ["dual", str(tmp_path / "t.parquet"), "--json", "--bogus"])
    assert usage.exit_code == ExitCode.USAGE_ERROR and _json(usage)["status"] == Outcome.USAGE_ERROR.value
    invalid = runner.invoke(app, ["dual", str(tmp_path / "t.parquet"), "--reward", "r", "--constraint", "g=0.1",
                                  "--beta", "-1", "--json"])  # fmt: skip
    assert invalid.exit_code == ExitCode.USER_ERROR and _json(invalid)["status"] == Outcome.INVALID.value
    missing = runner.invoke(app, ["dual", str(tmp_path / "t.parquet"), "--reward", "r", "--constraint", "g=0.1",
                                  "--beta", "1", "--json"])  # fmt: skip
    assert missing.exit_code == ExitCode.USER_ERROR and _json(missing)["status"] == Outcome.BAD_INPUT.value
    assert {_json(r)["status"] for r in (usage, invalid, missing)} <= known


def _troubleshooting() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]


def test_readme_lists_every_exit_code_and_outcome():
    section = _troubleshooting()
    rows = re.findall(r"^\| (\d+(?: \+ N)?) \|", section, re.M)
    listed = {int(r.split()[0]) for r in rows}
    assert listed == {int(c) for c in ExitCode}, rows
    assert f"{int(ExitCode.SIGNAL)} + N" in rows
    for outcome in Outcome:
        if outcome is not Outcome.RUNNING:  # never returned: the solver's state inside its loop
            assert f"`{outcome.value}`" in section, outcome
    for status in Status:
        if status is not Status.RUNNING:  # never returned: the solver's state inside its loop
            assert f"| `{status.label}` |" in section, status
