"""Output formats of ``genpipe audit query``: table, JSON, CSV, Parquet — each streams its records, so memory
stays flat in the size of the result — and ``open_output``, an atomic file at a path or fsspec URL.

JSON is an array of records as ``pipeline.audit.query`` builds them; CSV and Parquet flatten the ``review``
object into ``review_*`` columns and carry nested fields (scores, reasons, metadata, lora) as JSON text. CSV is
for spreadsheets: a text cell starting with = + - @ (a formula there) gets a leading ' and is shown as text.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.audit.chain import json_default
from pipeline.audit.records import _JSON, RECORD_FIELDS, RESULTS_SCHEMA
from pipeline.errors import GenpipeError
from pipeline.storage import Storage, StorageError

FORMATS = ("table", "json", "csv", "parquet")


class OutputError(GenpipeError):
    """The output file cannot be written."""


_REVIEW_COLUMNS = ("reviewer", "reason_code", "text", "at", "seq")
CSV_FIELDS = (*RECORD_FIELDS, "effective_decision", *(f"review_{c}" for c in _REVIEW_COLUMNS))
QUERY_SCHEMA = pa.schema(
    [
        *RESULTS_SCHEMA,
        pa.field("effective_decision", pa.string()),
        pa.field("review_reviewer", pa.string()),
        pa.field("review_reason_code", pa.string()),
        pa.field("review_text", pa.string()),
        pa.field("review_at", pa.timestamp("us", tz="UTC")),
        pa.field("review_seq", pa.int64()),
    ]
)
_JSON_COLUMNS = tuple(f.name for f in RESULTS_SCHEMA if f.metadata == _JSON)


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    """A record with the review flattened into ``review_*`` columns."""
    flat = {k: v for k, v in record.items() if k != "review"}
    review = record["review"] or {}
    flat.update({f"review_{c}": review.get(c) for c in _REVIEW_COLUMNS})
    return flat


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=json_default)


def write_json(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    out.write("[")
    for record in records:
        out.write(("\n" if n == 0 else ",\n") + _dumps(record))
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n


#: What a spreadsheet reads as the start of a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(value: Any) -> Any:
    """Text a spreadsheet would run as a formula (a prompt "=HYPERLINK(...)"), with a leading ' so it is shown
    as text. Numbers stay numbers; JSON and Parquet keep every value exactly."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def write_csv(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for record in records:
        flat = _flat(record)
        for name in (*_JSON_COLUMNS, "tags"):
            flat[name] = _dumps(flat[name])
        writer.writerow({name: _inert(value) for name, value in flat.items()})
        n += 1
    return n


_TABLE = (("item_id", 32), ("job", 24), ("prompt_id", 16), ("status", 9), ("effective_decision", 10),
          ("nsfw", 6), ("clipscore", 9), ("review_by", 12), ("prompt", 40))  # fmt: skip


def _cell(record: dict[str, Any], name: str) -> str:
    if name in ("nsfw", "clipscore"):
        value = record["scores"].get(name)
        return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else ""
    if name == "review_by":
        return (record["review"] or {}).get("reviewer") or ""
    value = record.get(name)
    return "" if value is None else " ".join(str(value).split())


def write_table(records: Iterator[dict[str, Any]], out: IO[str]) -> int:
    header = {"effective_decision": "decision", "review_by": "reviewer"}
    out.write("  ".join(header.get(n, n).ljust(w) for n, w in _TABLE).rstrip() + "\n")
    n = 0
    for record in records:
        cells = []
        for name, width in _TABLE:
            text = _cell(record, name)
            cells.append((text if len(text) <= width else text[: width - 1] + "…").ljust(width))
        out.write("  ".join(cells).rstrip() + "\n")
        n += 1
    out.write(f"({n} record{'s' * (n != 1)})\n")
    return n


def _parquet_row(record: dict[str, Any]) -> dict[str, Any]:
    row = _flat(record)
    for name in _JSON_COLUMNS:
        row[name] = _dumps(row[name])
    row["tags"] = [str(t) for t in row["tags"]]
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    if row["review_at"] is not None:
        row["review_at"] = datetime.fromisoformat(row["review_at"])
    return row


def write_parquet(
    records: Iterator[dict[str, Any]], out: IO[bytes], schema: pa.Schema = QUERY_SCHEMA, batch: int = 1000
) -> int:
    n = 0
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for record in records:
            rows.append(_parquet_row(record))
            if len(rows) == batch:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                n, rows = n + len(rows), []
        if rows or n == 0:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            n += len(rows)
    return n


WRITERS = {"table": write_table, "json": write_json, "csv": write_csv, "parquet": write_parquet}


@contextmanager
def open_output(url: str, binary: bool) -> Iterator[IO[Any]]:
    """A file at ``url`` (path or fsspec URL) that appears complete or not at all."""
    root, _, name = url.rpartition("/")
    if not name or name in (".", ".."):
        raise OutputError(f"--out {url!r}: not a file name")
    if url.startswith("/") and not root or root.endswith(":/"):
        root += "/"  # a file right under the filesystem root, or file:///name
    try:
        storage = Storage(root or ".")
        if storage.fs.isdir(storage.path(name)):
            raise OutputError(f"--out {url}: is a directory; name a file in it")
        with storage.open_atomic(name) as f:
            if binary:
                yield f
                return
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            try:
                yield text
                text.flush()
            finally:
                text.detach()  # the atomic writer closes (and publishes) the file, not the wrapper
    except (OSError, ValueError, ImportError, StorageError) as exc:  # ImportError: the fsspec backend is missing
        if isinstance(exc, UnicodeError):
            raise
        raise OutputError(f"--out {url}: cannot write: {exc}") from None
