"""What `can` may overwrite: never an input, and only what it made (DESIGN §5).

Every command resolves its paths (symlinks, `.`, `..`, relative paths) and refuses an output that is one of its
inputs or a folder holding one (`check_not_inputs`). A file output replaces only an artifact `can` wrote, as that
artifact's owner reads it (`replaceable`). A folder a run writes into (`can train`'s OUT, a demo's folder, an
evaluation's) lists the entries `can` made in its marker, `OUT/.can-made.json`, and only those are replaced or
cleaned (`claim`): a user's own `data/` in the folder given as --out is never touched. Runs record the models and
files they were given by resolved path (`bridge.files.spelled`), so the same command from another folder resumes them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from bridge.files import atomic_write_text, path_problem, resolved
from can_jax.errors import OutputError

MARKER = ".can-made.json"


def check_not_inputs(outputs: list[tuple[str, object]], inputs: list[tuple[str, object]]) -> None:
    """Refuses (`OutputError`, one line) an output that would overwrite an input: the same path once resolved, or a
    folder that holds the input. Inputs that are not existing paths (a Hub id, an unset option) are skipped."""
    ins = [(name, value, resolved(value)) for name, value in inputs
           if isinstance(value, (str, os.PathLike)) and str(value) and os.path.lexists(value)]  # fmt: skip
    for out_name, out in outputs:
        target = resolved(out)
        for in_name, value, src in ins:
            if target == src or target in src.parents:
                what = "is" if target == src else "holds"
                raise OutputError(f"{out_name} {out} {what} the input {in_name} {value}: writing it would destroy "
                                  "that input; choose another output path")  # fmt: skip


def made_by_can(folder: str | os.PathLike) -> set[str] | None:
    """The entries of `folder` that its marker says `can` made; None without a marker (an unreadable one counts as
    an empty list: nothing in it is trusted)."""
    marker = Path(folder) / MARKER
    if not os.path.lexists(marker):
        return None
    try:
        body = json.loads(marker.read_text())
        return {str(e) for e in body["entries"]} if body.get("format") == "can.made" else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def claim(folder: str | os.PathLike, names: list[str], legacy: Callable[[Path], bool] | None = None,
          write: bool = True) -> None:  # fmt: skip
    """Checks that `can` may replace or delete `names` in `folder`, then (with `write`) makes the folder and lists
    them in its marker. Refuses (`OutputError`, one line) an entry that exists and that `can` did not make.
    `legacy(folder)`: whether a folder without a marker was written by a `can` run from before markers (its own
    record file, parsed), so that reruns on it keep working. Under several processes every rank checks
    (`write=False`), then the main process writes, after a barrier."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"cannot write into {folder}: it is a file, not a folder")
    made = made_by_can(folder)
    trusted = made is None and legacy is not None and folder.is_dir() and legacy(folder)
    for name in names:
        path = folder / name
        if os.path.lexists(path) and name not in (made or set()) and not trusted:
            raise OutputError(f"{path} exists and was not made by can: can replaces or deletes only what it made "
                              f"(listed in {folder / MARKER}); choose another output folder")  # fmt: skip
    if write and not set(names) <= (made or set()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot write into {folder}: {path_problem(folder, err)}") from None
        body = {"format": "can.made", "entries": sorted((made or set()) | set(names))}
        atomic_write_text(folder / MARKER, json.dumps(body, indent=1) + "\n")


def json_format(path: Path, prefix: str = "can.") -> bool:
    """Whether `path` is a JSON object whose `format` starts with `prefix` (a certificate, a record of `can`'s)."""
    try:
        body = json.loads(Path(path).read_text())
        return isinstance(body, dict) and str(body.get("format", "")).startswith(prefix)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def replaceable(path: str | os.PathLike) -> bool:
    """Whether an output may replace what is at `path`: nothing; an entry its folder's marker lists; or an artifact
    `can` wrote, as its owner reads it (a JSON record with a `can.` format, a scores table with its collect record,
    a preference set). A folder that merely holds a marker is not replaceable as a whole: it may hold the user's
    files beside what `can` made."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    if path.name in (made_by_can(path.parent) or set()):
        return True
    if path.suffix == ".json" and path.is_file():
        return json_format(path)
    try:
        from bridge.preferences import PreferenceSet
        from bridge.scores_table import collect_record

        if PreferenceSet.read_metadata(path)[0]:
            return True
        return path.suffix == ".parquet" and not collect_record(path).empty
    except Exception:  # unreadable, or not what its name says: not ours
        return False


def is_png(path: str | os.PathLike) -> bool:
    """Whether `path` holds a PNG image (a plot a previous run wrote): what a `--plot` may replace."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False
