"""The scores table ① as an artifact: the rows `can collect` wrote, and what it recorded about them.

The table itself is long format, one row per response (DESIGN: formats): `bridge.tables` reads and validates its
columns. This module owns the table's collect record — the `can.collect` schema metadata of a Parquet table:
the settings, the scorers that made each column (spec, template), the PeCAN models and their β, the tokenizer's
fingerprint, and whether `logp_ref` is log π_ref of exactly the sampled ids (uncut, float32). No other module
reads or writes that metadata: they ask a `CollectRecord`.

Record versions: 1 had no `format_version` field (tables collected before it was added; read as they are);
2 adds it. A newer version is refused in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from bridge.files import write_parquet
from can_jax.errors import ScoresFormatError

_KEY = b"can.collect"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class CollectRecord:
    """What `can collect` (or `can logratios`) recorded about a table; `empty` for a table made elsewhere."""

    meta: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.meta

    @property
    def scorers(self) -> dict:
        """NAME → {spec, template, …} of each scorer column (empty for tables collected before records were kept)."""
        rec = self.meta.get("scorers")
        return rec if isinstance(rec, dict) else {}

    @property
    def pecan(self) -> dict:
        """NAME → {policy, beta} of the pre-aligned models a PeCAN table was collected with (empty if none)."""
        return self.meta.get("pecan") or {}

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.meta.get("tokenizer_sha256")

    @property
    def logp_ref_exact(self) -> bool:
        """Whether `logp_ref` is log π_ref of exactly the sampled ids, uncut, under the float32 policy (`can train`
        may then use it in place of TRL's reference pass)."""
        return bool(self.meta.get("logp_ref_exact"))

    @property
    def sampling(self) -> dict:
        """{engine, logp_gap: {median, max}}: which engine drew the samples and how far its own log-probs are from
        log π_ref (nats per sequence); empty for tables collected before it was recorded (the exact loop)."""
        return dict(self.meta.get("sampling") or {})

    def count(self, name: str) -> int:
        """A recorded count: samples, unfinished, not_retokenizing."""
        return int(self.meta.get(name) or 0)

    def scorer_block(self, reward: str, names: list[str], kinds: list[str]) -> dict:
        """The certificate's `scorers` block: for the reward and each constraint, what made the column (spec and
        template as recorded; null for a table made elsewhere) and its sign (+1, or −1 for a cost read negated)."""
        out = {}
        for name, kind in [(reward, "reward"), *zip(names, kinds, strict=True)]:
            rec = self.scorers.get(name) or {}
            out[name] = {"role": "reward" if kind == "reward" else "constraint", "sign": -1 if kind == "cost" else 1,
                         "spec": rec.get("spec"), "template": rec.get("template")}  # fmt: skip
        return out

    @classmethod
    def build(cls, settings: dict, scorer_specs: list, tokenizer_sha256: str, logp_ref_exact: bool, scorers: dict,
              samples: int, unfinished: int, not_retokenizing: int, pecan: dict | None = None,
              sampling: dict | None = None) -> CollectRecord:  # fmt: skip
        """The record `can collect` writes: its settings, then what it found. `scorers` holds each scorer's record
        (spec, template, …) by name; the settings' own `scorers` list of NAME=SPEC texts is kept as `scorer_specs`."""
        meta = {**settings, "scorer_specs": scorer_specs, "tokenizer_sha256": tokenizer_sha256,
                "logp_ref_exact": logp_ref_exact, "scorers": scorers, "samples": samples, "unfinished": unfinished,
                "not_retokenizing": not_retokenizing}  # fmt: skip
        if pecan:
            meta["pecan"] = pecan
        if sampling:
            meta["sampling"] = sampling
        return cls(meta)

    def with_pecan(self, models: dict, logp_ref_exact: bool) -> CollectRecord:
        """This record for a table that `can logratios` gave PeCAN columns: its models replace any earlier ones,
        and `logp_ref` was recomputed (exact or not, by that run's settings)."""
        return CollectRecord({**self.meta, "pecan": models, "logp_ref_exact": logp_ref_exact})


def _parse(raw: bytes | None, where: str) -> CollectRecord:
    if not raw:
        return CollectRecord()
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ScoresFormatError(f"{where}: its can.collect metadata is not JSON (was the file edited?)") from None
    if not isinstance(meta, dict):
        raise ScoresFormatError(f"{where}: its can.collect metadata is not a record")
    version = meta.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise ScoresFormatError(
            f"{where}: collect record version {version!r} is not supported (this can reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}): update can"
        )
    return CollectRecord(meta)


def collect_record(source: str | os.PathLike | pa.Table) -> CollectRecord:
    """The collect record of a Parquet table (a path or an Arrow table read from one); empty for a JSONL/CSV table
    or a Parquet table made elsewhere."""
    from bridge.tables import ScoresFile

    if isinstance(source, ScoresFile):
        source = source.table
    if isinstance(source, pa.Table):
        return _parse((source.schema.metadata or {}).get(_KEY), "the scores table")
    path = Path(source)
    if not path.is_file():
        return CollectRecord()
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            return CollectRecord()
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError):
        return CollectRecord()
    return _parse(metadata.get(_KEY), str(path))


def write_scores_table(path: str | os.PathLike, table: pa.Table, record: dict | CollectRecord) -> Path:
    """Writes a collected table as Parquet, atomically, with its collect record (stamped with the format version)."""
    meta = record.meta if isinstance(record, CollectRecord) else record
    meta = {**meta, "format_version": FORMAT_VERSION}
    return write_parquet(path, table.replace_schema_metadata({_KEY: json.dumps(meta).encode()}))
