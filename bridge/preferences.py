"""The preference set ③ as an artifact: the labelled pairs `can label` writes and `can train` reads.

Parquet (the record and the certificate in the schema metadata) or a `datasets` directory (`save_to_disk`; the
record as JSON in the description — `datasets` keeps no Parquet metadata and `DatasetInfo` has no free-form field —
and `certificate.json` beside the data files). Either loads in plain TRL as it is.

`PreferenceSet` owns that metadata. Its record says how the pairs were made (mode, seed, …) and refers to its
certificate by SHA-256; β and λ* exist once, in the certificate. The reader refuses a set whose certificate does
not match that hash (edited after labelling), or whose record is of an unknown version.

Versions: 1 (no `format_version`) carried copies of β and λ* beside the certificate; it is read if those copies
agree with the certificate. 2 is written now.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from bridge.certificate import FILE_NAME, Certificate, sha256_of
from bridge.files import write_parquet
from can_jax.errors import CanError

_RECORD_KEY = b"can"
_CERT_KEY = b"can.certificate"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True, eq=False)
class PreferenceSet:
    """Labelled pairs (prompt, chosen, rejected, score_chosen, score_rejected, p_chosen, optional sampled ids and
    their recorded log π_ref), how they were made, and the certificate whose λ* labelled them (None for a plain
    preference table from elsewhere: its β must then be given)."""

    table: pa.Table
    record: dict = field(default_factory=dict)
    certificate: Certificate | None = None

    @property
    def mode(self) -> str:
        """bt, soft or hard; "plain" for a table from elsewhere (read as hard labels)."""
        return self.record.get("mode", "plain")

    @property
    def beta(self) -> float | None:
        return None if self.certificate is None else self.certificate.beta

    @property
    def lam(self) -> dict:
        return {} if self.certificate is None else self.certificate.lam

    @property
    def tokenizer_sha256(self) -> str | None:
        """The fingerprint of the tokenizer that sampled the pairs' ids (`can train` refuses another)."""
        return self.record.get("tokenizer_sha256")

    def _stamped(self) -> dict:
        record = {k: v for k, v in self.record.items() if k not in ("beta", "lambda")}
        record["format_version"] = FORMAT_VERSION
        if self.certificate is not None:
            record["certificate_sha256"] = self.certificate.sha256
        return record

    def write(self, out: str | os.PathLike) -> Path:
        """Writes the set to `out`: a .parquet file, or else a `datasets` directory. Atomic either way (a directory
        is written beside and renamed into place)."""
        out = Path(out)
        record = self._stamped()
        table = self.table.replace_schema_metadata(None)
        if out.suffix == ".parquet":
            meta = {_RECORD_KEY: json.dumps(record).encode()}
            if self.certificate is not None:
                meta[_CERT_KEY] = json.dumps(self.certificate.to_dict()).encode()
            return write_parquet(out, table.replace_schema_metadata(meta))
        from datasets import Dataset, DatasetInfo

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ds = Dataset(table, info=DatasetInfo(description=json.dumps({"can": record})))
        ds.save_to_disk(str(tmp))
        if self.certificate is not None:
            (tmp / FILE_NAME).write_text(self.certificate.to_json())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    @classmethod
    def read_metadata(cls, path: str | os.PathLike) -> tuple[dict, Certificate | None]:
        """(record, certificate) of a preference set written by `can label` (Parquet or directory), validated;
        ({}, None) for any other dataset."""
        path = Path(path)
        record, raw_cert = {}, None
        if path.is_dir():
            info = path / "dataset_info.json"
            if not info.exists():
                return {}, None
            try:
                record = json.loads(json.loads(info.read_text()).get("description") or "{}").get("can", {})
            except (json.JSONDecodeError, AttributeError):
                return {}, None
            cert_file = path / FILE_NAME
            if record and cert_file.exists():
                try:
                    raw_cert = json.loads(cert_file.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise CanError(f"{cert_file} is not JSON (was it edited?)") from None
        elif path.suffix == ".parquet" and path.is_file():
            import pyarrow.parquet as pq

            try:
                md = pq.read_schema(path).metadata or {}
            except (pa.ArrowInvalid, OSError):
                return {}, None
            try:
                record = json.loads(md[_RECORD_KEY]) if _RECORD_KEY in md else {}
                raw_cert = json.loads(md[_CERT_KEY]) if _CERT_KEY in md else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CanError(f"{path}: its can metadata is not JSON (was it edited?)") from None
        if not record:
            return {}, None
        return _checked(record, raw_cert, str(path))


def _checked(record: dict, raw_cert, where: str) -> tuple[dict, Certificate | None]:
    """The record and its certificate, with the certificate matched to the record's hash (and, in version 1, to
    the record's copies of β and λ*)."""
    version = record.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise CanError(f"{where}: preference set format version {version!r} is not supported (this can reads "
                       f"versions {', '.join(map(str, READABLE_VERSIONS))}): update can")  # fmt: skip
    if raw_cert is None:
        raise CanError(f"{where}: a `can label` preference set without its certificate: label again with `can label`")
    want = record.get("certificate_sha256")
    if want is not None and sha256_of(raw_cert) != want:
        raise CanError(f"{where}: its certificate does not match the hash it was labelled with (sha256 "
                       f"{str(want)[:12]}…): was it edited? label again with `can label`")  # fmt: skip
    cert = Certificate.from_dict(raw_cert, f"{where}: its certificate")
    if version == 1:
        if record.get("beta") is not None and record["beta"] != cert.beta:
            raise CanError(f"{where}: β {record['beta']} in its metadata differs from its certificate's "
                           f"{cert.beta}: was it edited? label again with `can label`")  # fmt: skip
        if isinstance(record.get("lambda"), dict) and record["lambda"] != cert.lam:
            raise CanError(f"{where}: λ* in its metadata differs from its certificate's: was it edited? label "
                           "again with `can label`")  # fmt: skip
        record = {k: v for k, v in record.items() if k not in ("beta", "lambda")}
    return record, cert
