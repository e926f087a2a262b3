"""Reading and validating scores tables (DESIGN §8): long format, one row per response.

Parquet (recognised by its magic bytes, whatever the suffix), JSON Lines or CSV (by suffix) are read with
pyarrow; the user names the reward column and the constraint columns (utilities, or costs that are negated on the
way in). Bad rows are named, never guessed at. A prompt column holds text or a conversation (TRL's conversational
format: a list of {role, content} messages); one prompt id has exactly one prompt.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from bridge.files import sha256_file
from can_jax.errors import DegenerateDataError, ScoresFormatError

if TYPE_CHECKING:
    from can_jax.packed import Packed
    from can_jax.scores import Scores

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
}


@dataclass(frozen=True)
class ConstraintSpec:
    """One safety constraint: a table column, its margin b, and whether the column is a utility or a cost."""

    column: str
    margin: float
    kind: str = "utility"  # "utility" (higher = safer) or "cost" (lower = safer; negated on the way in)

    @property
    def sign(self) -> float:
        return sign_of(self.kind)


def sign_of(kind: str) -> float:
    """The one cost-sign rule: a cost column is read negated (g = −c), a utility or the reward as it is."""
    return -1.0 if kind == "cost" else 1.0


def numeric_values(column) -> np.ndarray:
    """A numeric Arrow column as one NumPy array (nulls as NaN). Without nulls the values are read from the Arrow
    buffers directly: pyarrow's own `to_numpy` imports pandas on first use (a third of a second per process)."""
    column = pa.chunked_array(column)
    kind = column.type
    if column.null_count == 0 and (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        code = "f" if pa.types.is_floating(kind) else "i" if pa.types.is_signed_integer(kind) else "u"
        dtype = np.dtype(f"{code}{kind.bit_width // 8}")
        parts = [np.frombuffer(c.buffers()[1], dtype, count=len(c), offset=c.offset * dtype.itemsize)
                 for c in column.chunks if len(c)]  # fmt: skip
        if not parts:
            return np.empty(0, dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return np.asarray(column.to_numpy(zero_copy_only=False))


def group_prompts(ids) -> tuple[np.ndarray, np.ndarray]:
    """(index [R] int64, unique ids [N]): each row's prompt number, prompts numbered by first appearance (hash
    encoding: O(rows), and a table grouped by prompt keeps its order). The one prompt grouping of every stage.
    Integer ids in non-decreasing order (what `can collect` writes) take a vectorised path with the same result."""
    ids = pa.chunked_array(ids)
    if pa.types.is_integer(ids.type) and ids.null_count == 0 and len(ids) > 0:
        values = numeric_values(ids)
        if bool(np.all(values[1:] >= values[:-1])):
            first = np.empty(values.shape[0], bool)
            first[0] = True
            np.not_equal(values[1:], values[:-1], out=first[1:])
            return np.cumsum(first, dtype=np.int64) - 1, values[first]
    encoded = ids.combine_chunks().dictionary_encode()
    index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return index, encoded.dictionary.to_numpy(zero_copy_only=False)


def parse_column_value(text: str, flag: str, value_name: str) -> tuple[str, float]:
    """`COL=VALUE` → (column, finite float); errors name the flag (`--constraint`, `--cost-at-most`, …)."""
    col, sep, raw = text.rpartition("=")
    if not sep or not col:
        raise ScoresFormatError(f"{flag} {text!r} is not of the form COLUMN={value_name.upper()}")
    try:
        value = float(raw)
    except ValueError:
        raise ScoresFormatError(f"{flag} {text!r}: {value_name} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ScoresFormatError(f"{flag} {text!r}: the {value_name} must be a finite number")
    return col, value


def parse_constraint(text: str, kind: str = "utility") -> ConstraintSpec:
    """Parses `COL=MARGIN` (the CLI's --constraint / --cost)."""
    col, value = parse_column_value(text, "--cost" if kind == "cost" else "--constraint", "margin")
    return ConstraintSpec(col, value, kind)


def printable(text: str, limit: int = 160) -> str:
    """One printable line of at most `limit` characters (a reader's message may quote raw bytes of a bad file)."""
    text = " ".join(str(text).split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _sniff(path: Path) -> str:
    """The table format: Parquet by its magic bytes; otherwise by suffix, refusing binary content as text."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return _format(path, head)


def _format(path: Path, head: bytes) -> str:
    if head[:4] == b"PAR1":
        return "parquet"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt == "parquet":
        raise ScoresFormatError(f"{path} is not a Parquet file (no PAR1 magic bytes): is the suffix wrong?")
    if fmt is None:
        raise ScoresFormatError(f"cannot tell the format of {path}: use a .parquet, .jsonl or .csv suffix")
    if b"\0" in head:
        raise ScoresFormatError(f"{path} looks binary, not {fmt.upper()} text: is it the right file?")
    return fmt


@dataclass(frozen=True)
class ScoresFile:
    """A scores table read once: its bytes hashed as they are parsed, every column in memory. Every function that
    takes a scores path takes one of these too and opens nothing (a refine run reads its table once, whatever
    the number of rounds); `os.fspath` gives the path, for messages and for code that must open it."""

    path: str
    table: pa.Table
    sha256: str

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path


def open_scores(path: str | os.PathLike) -> ScoresFile:
    """Reads the scores table at `path` once: its SHA-256 from the same bytes the table is parsed from."""
    import hashlib

    if isinstance(path, ScoresFile):
        return path
    path = _existing(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ScoresFormatError(f"cannot read {path}: {printable(err.strerror or err)}") from None
    table = _parse(path, _format(path, data[:4096]), pa.BufferReader(data))
    return ScoresFile(str(path), table, hashlib.sha256(data).hexdigest())


def scores_sha256(source) -> str:
    """The SHA-256 of a scores table's file (a `ScoresFile` knows it already)."""
    return source.sha256 if isinstance(source, ScoresFile) else sha256_file(source)


def read_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Reads a scores table from Parquet, JSON Lines or CSV. With `columns`, a Parquet table is read with only those
    of them it has (the others are never decoded); `table_columns` names all of a table's columns. A `ScoresFile`
    gives its columns from memory."""
    if isinstance(path, ScoresFile):
        names = path.table.column_names
        return path.table if columns is None else path.table.select([c for c in dict.fromkeys(columns) if c in names])
    path = _existing(path)
    try:
        fmt = _sniff(path)
    except OSError as err:
        raise ScoresFormatError(f"cannot read {path}: {printable(err.strerror or err)}") from None
    return _parse(path, fmt, path, columns)


def _existing(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ScoresFormatError(f"{path} is a directory, not a scores file (.parquet, .jsonl or .csv)")
    if not path.exists():
        raise ScoresFormatError(f"scores file not found: {path}")
    return path


def _parse(path: Path, fmt: str, source, columns: list[str] | None = None) -> pa.Table:
    """The table in `source` (the file's path, or its bytes in a `pa.BufferReader`) read as `fmt`; with `columns`,
    only those a Parquet file has. A file that does not parse is refused in one line."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            # ParquetFile, not pq.read_table: the latter goes through pyarrow.dataset, whose import (pandas
            # included) costs a third of a second in every `can dual`.
            with pq.ParquetFile(source) as parquet:
                names = parquet.schema_arrow.names
                wanted = None if columns is None else [c for c in dict.fromkeys(columns) if c in names]
                return parquet.read(columns=wanted)
        if fmt == "json":
            import pyarrow.json as pj

            return pj.read_json(source)
        import pyarrow.csv as pc

        return pc.read_csv(source)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ScoresFormatError(f"cannot read {path} as {fmt}: {printable(first)}") from None


@dataclass(frozen=True)
class Columns:
    """A validated table's score columns, rows grouped by `index` (prompt 0..N-1 in padded order)."""

    index: np.ndarray  # [R]
    reward: np.ndarray  # [R]
    utility: tuple  # m columns [R], costs negated
    counts: np.ndarray  # [N] rows per prompt
    ref_utility: np.ndarray | None = None  # [N, m] E_ref[g | x_i] where reference columns give it


@dataclass(frozen=True)
class LoadedScores:
    """A validated scores table, with what a certificate records about it. Its arrays are built when first asked
    for: `scores` (padded [N, K, m]) or `packed` (the CPU pass's layout, written straight from the columns)."""

    columns: Columns
    names: list[str]  # constraint names (column names)
    margins: np.ndarray  # [m]
    kinds: list[str]
    prompt_ids: np.ndarray  # [N] original prompt ids in padded order
    n_rows: int
    dropped_rows: int
    sha256: str
    path: str
    ref_columns: dict | None = None  # constraint → column giving E_ref[g | x] (else the sample mean)
    bad_rows: str = "refused"  # the rule applied to bad rows: "refused" or "dropped" (--drop-bad-rows)
    dtype: np.dtype = np.dtype(np.float64)  # the dtype the dual is computed in (scores may be stored narrower)
    source: ScoresFile | None = None  # the table read once it came from, for stages that need more of it

    @cached_property
    def scores(self) -> Scores:
        from can_jax.scores import from_grouped

        c = self.columns
        return from_grouped(c.index, c.reward, c.utility, counts=c.counts, ref_utility=c.ref_utility)

    @cached_property
    def packed(self) -> Packed:
        from can_jax.packed import from_grouped

        c = self.columns
        return from_grouped(c.index, c.reward, c.utility, c.counts, c.ref_utility, dtype=self.dtype)

    def for_solve(self, devices: int) -> Scores | Packed:
        """What the dual's passes read: `packed` on CPU with one device, else `scores`."""
        from can_jax.packed import packable

        return self.packed if packable(None, devices) else self.scores


def _rows_list(rows: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"{shown}{more}"


def _numeric_column(table: pa.Table, name: str, keep_float32: bool = False) -> np.ndarray:
    """A score column as floats (nulls become NaN): float64, or float32 kept as it is stored when asked."""
    col = table.column(name)
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise ScoresFormatError(f"column {name!r} must be numeric, found {col.type}")
    dtype = np.float32 if keep_float32 and pa.types.is_float32(col.type) else np.float64
    return np.asarray(numeric_values(col), dtype=dtype)


def prompt_keys(column, name: str = "prompt") -> tuple[np.ndarray, np.ndarray]:
    """(key [R] str or None, empty [R] bool) for a prompt column of text or conversations.

    Text is its own key. A conversation (a list of {role, content} messages, TRL's conversational format) is
    keyed by its canonical JSON, so two conversations are the same prompt exactly when they are equal as
    structures. Empty: null, blank text, no messages, or only blank contents. Malformed messages raise one line.
    """
    column = pa.chunked_array(column) if not isinstance(column, pa.ChunkedArray) else column
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        values = column.to_pylist()
        keys = np.array(values, dtype=object)
        empty = np.array([v is None or not v.strip() for v in values], bool)
        return keys, empty
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise ScoresFormatError(
            f"column {name!r} must be text or a conversation (a list of {{role, content}} messages), found {kind}"
        )
    keys = np.empty(len(column), dtype=object)
    empty = np.zeros(len(column), bool)
    for row, value in enumerate(column.to_pylist()):
        if value is None or len(value) == 0:
            empty[row] = True
            continue
        for msg in value:
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise ScoresFormatError(
                    f"column {name!r}, row {row}: every message of a conversation needs a text 'role' "
                    f"(got {printable(repr(msg), 80)})"
                )
            if not isinstance(msg.get("content"), str):
                raise ScoresFormatError(
                    f"column {name!r}, row {row}: message {printable(msg['role'], 20)!r} needs a text 'content' "
                    f"(got {printable(repr(msg.get('content')), 80)})"
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        keys[row] = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        empty[row] = not any(m["content"].strip() for m in messages)
    return keys, empty


def check_one_prompt_per_id(ids, keys: np.ndarray, where: str, prompt_id: str, name: str = "prompt") -> None:
    """Refuses a prompt id that carries more than one distinct prompt (its responses would be pooled or paired
    across prompts). ids, keys: [R] for the rows in use."""
    if len(keys) == 0:
        return
    t = pa.table({"id": ids, "key": pa.array(list(keys), pa.string())})
    counts = t.group_by("id").aggregate([("key", "count_distinct")])
    many = counts.filter(pa.compute.greater(counts.column("key_count_distinct"), 1))
    if many.num_rows:
        shown = ", ".join(printable(repr(v), 40) for v in many.column("id").to_pylist()[:5])
        worst = max(many.column("key_count_distinct").to_pylist())
        raise ScoresFormatError(
            f"{where}: {many.num_rows} {prompt_id} value(s) with several {name}s (up to {worst} different prompts), "
            f"e.g. {prompt_id} {shown}: one {prompt_id} must name one prompt; give each prompt its own id"
        )


def bad_rows(table: pa.Table, reward: str, columns: list[str], prompt_id: str, extra: list[str] = ()) -> np.ndarray:
    """[R] bool: rows `can dual` refuses (or drops with --drop-bad-rows): NaN/inf/missing reward, constraint or
    reference scores, a missing prompt id, an empty prompt. The one rule `dual` and `label` share."""
    values = [_numeric_column(table, c) for c in [reward, *columns, *extra]]
    empty = prompt_keys(table.column("prompt"))[1] if "prompt" in table.column_names else None
    return bad_mask(values, _null(table.column(prompt_id)), empty)


def _null(column) -> np.ndarray:
    if column.null_count == 0:
        return np.zeros(len(column), bool)
    return np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)


def bad_mask(values: list[np.ndarray], pid_null: np.ndarray, empty: np.ndarray | None = None) -> np.ndarray:
    """[R] bool: the bad-row rule on arrays already read — any non-finite score (values: [R] or [R, c] arrays),
    a missing prompt id, an empty prompt."""
    bad = pid_null.copy()
    for v in values:
        bad |= ~np.isfinite(v) if v.ndim == 1 else ~np.isfinite(v).all(axis=1)
    if empty is not None:
        bad |= empty
    return bad


def load_scores(
    path: str | os.PathLike,
    reward: str,
    constraints: list[ConstraintSpec],
    prompt_id: str = "prompt_id",
    drop_bad_rows: bool = False,
    dtype=None,
    ref_columns: dict[str, str] | None = None,
    keep_float32: bool = False,
) -> LoadedScores:
    """Reads, validates and pads a scores table.

    Errors (ScoresFormatError) name the missing columns or the offending rows (0-based data rows). With
    `drop_bad_rows`, rows with NaN/inf/missing scores are dropped instead and counted.
    `ref_columns` maps a constraint column to a per-response column whose per-prompt mean is E_ref[g_j | x]
    (in the constraint column's own units; PeCAN's −β_g·KL, DESIGN §3); other constraints use the sample mean.
    `dtype` is the solve's (float64 by default); with `keep_float32` float32 columns stay float32 in the padded
    arrays and `LoadedScores.dtype` says to compute in float64 (the solver upcasts block by block).
    """
    if not constraints:
        raise ScoresFormatError("give at least one constraint (--constraint COL=MARGIN or --cost COL=MARGIN)")
    names = [c.column for c in constraints]
    if len(set(names)) != len(names):
        raise ScoresFormatError(f"a constraint column is named twice: {names}")
    ref_columns = dict(ref_columns or {})
    unknown = sorted(set(ref_columns) - set(names))
    if unknown:
        raise ScoresFormatError(f"reference columns given for {unknown}, which are not constraints {names}")
    # The file's SHA-256 (for the certificate) is computed while the table is parsed: hashlib releases the GIL.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        known = isinstance(path, ScoresFile)
        digest = pool.submit(sha256_file, path) if not known and Path(path).is_file() else None
        needed = [prompt_id, reward, *names, *ref_columns.values()]
        table = read_table(path, columns=[*needed, "prompt"])
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise ScoresFormatError(f"{path}: missing column(s) {missing}; the table has {_all_columns(path, table)}")
        loaded = _validated(path, table, reward, constraints, prompt_id, drop_bad_rows, dtype, ref_columns,
                            keep_float32, names)  # fmt: skip
        sha = path.sha256 if known else digest.result() if digest is not None else sha256_file(path)
        return replace(loaded, sha256=sha, source=path if known else None)


def load_for(path, cert) -> LoadedScores:
    """The scores table read exactly as `can dual` read it for certificate `cert`: its columns, kinds, margins,
    reference columns and bad-row rule, in float64."""
    specs = [ConstraintSpec(n, m, k) for (n, m), k in zip(cert.margins.items(), cert.kinds, strict=True)]
    return load_scores(path, cert.reward, specs, cert.prompt_id, drop_bad_rows=cert.drops_bad_rows,
                       ref_columns=cert.reference_columns or None)  # fmt: skip


def _all_columns(path, table: pa.Table) -> list[str]:
    """Every column of the table at `path` (`table` may have been read with some of them only)."""
    if isinstance(path, ScoresFile):
        return path.table.column_names
    if _sniff(Path(path)) == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path).names
    return table.column_names


def _validated(path, table, reward, constraints, prompt_id, drop_bad_rows, dtype, ref_columns, keep_float32, names):
    """`load_scores` on a table read with its needed columns (sha256 left empty)."""
    if table.num_rows == 0:
        raise ScoresFormatError(f"{path}: the scores table has no rows")

    # Columns as stored: float32 stays float32 when the solve computes in float64 block by block (`keep_float32`,
    # no float64 copy of the table); otherwise the requested dtype.
    float32 = dtype is not None and np.dtype(dtype) == np.float32
    native = keep_float32 or float32
    r = _numeric_column(table, reward, native)
    g = []
    for c in constraints:
        col = _numeric_column(table, c.column, native)
        g.append(-col if c.sign < 0 else col)
    if float32:
        r, g = r.astype(np.float32, copy=False), [c.astype(np.float32, copy=False) for c in g]
    ref = {j: c.sign * _numeric_column(table, ref_columns[c.column]) for j, c in enumerate(constraints)
           if c.column in ref_columns}  # fmt: skip
    pid_col = table.column(prompt_id)
    keys, empty = prompt_keys(table.column("prompt")) if "prompt" in table.column_names else (None, None)
    bad = bad_mask([r, *g, *ref.values()], _null(pid_col), empty)
    rows_bad = np.flatnonzero(bad)
    if len(rows_bad) and not drop_bad_rows:
        raise ScoresFormatError(
            f"{path}: {len(rows_bad)} row(s) with NaN/inf/missing scores, a missing prompt id or an empty "
            f"prompt: rows {_rows_list(rows_bad)} (0-based); fix them or pass --drop-bad-rows"
        )
    keep = ~bad
    if not keep.any():
        raise ScoresFormatError(f"{path}: every row is bad; nothing left to solve on")
    if keys is not None:
        check_one_prompt_per_id(pa.chunked_array(pid_col).filter(pa.array(keep)), keys[keep], str(path), prompt_id)
    if keep.all():
        index, uniq = group_prompts(pid_col)
    else:
        index, uniq = group_prompts(pa.chunked_array(pid_col).filter(pa.array(keep)))
        r, g = r[keep], [c[keep] for c in g]
        ref = {j: v[keep] for j, v in ref.items()}
    counts = np.bincount(index)
    ref_utility = None
    if ref:
        # E_ref[g_j | x_i] from the reference columns (per-prompt means); the sample mean elsewhere.
        sums = np.stack([np.bincount(index, ref.get(j, g[j]), minlength=len(counts)) for j in range(len(names))], 1)
        ref_utility = sums / np.maximum(counts, 1)[:, None]  # [N, m]
    if counts.max() < 2:
        raise DegenerateDataError(
            f"{path}: every prompt has fewer than two responses; the dual needs K_i ≥ 2 samples of π_ref per "
            "prompt to see how reweighting changes the scores"
        )
    return LoadedScores(
        columns=Columns(index, r, tuple(g), counts, ref_utility),
        names=names,
        margins=np.array([c.margin for c in constraints]),
        kinds=[c.kind for c in constraints],
        prompt_ids=uniq,
        n_rows=int(table.num_rows),
        dropped_rows=int(bad.sum()),
        sha256="",
        path=str(path),
        ref_columns=ref_columns,
        bad_rows="dropped" if drop_bad_rows else "refused",
        dtype=np.dtype(np.float32 if float32 else np.float64),
    )
