"""The public shape of an audit record (``audit query --format json``, results.parquet) and the Parquet export.

``item_to_record`` is what a reader sees, separate from what the pipeline writes (``Item``): the fields
DESIGN.md promises, plus ``model_revision``, ``lora`` and ``seed_source``, without which an image cannot
be reproduced. In results.parquet the free-form nested fields (``scores``, ``reasons``, ``metadata``,
``lora``) are JSON text (field metadata ``encoding: json``), because their keys differ from item to item
and a struct column would need one fixed set; ``tags`` is a proper ``list<string>``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.audit.store import AuditStore, json_default
from schemas.record import Item

_JSON = {b"encoding": b"json"}

#: Columns of results.parquet, in record order.
RESULTS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("job", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("negative_prompt", pa.string()),
        pa.field("sample_index", pa.int64(), nullable=False),
        pa.field("seed", pa.int64()),
        pa.field("seed_source", pa.string()),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_revision", pa.string()),
        pa.field("lora", pa.string(), nullable=False, metadata=_JSON),
        pa.field("sampler", pa.string(), nullable=False),
        pa.field("steps", pa.int64(), nullable=False),
        pa.field("guidance_scale", pa.float64(), nullable=False),
        pa.field("width", pa.int64(), nullable=False),
        pa.field("height", pa.int64(), nullable=False),
        pa.field("campaign", pa.string()),
        pa.field("sku", pa.string()),
        pa.field("locale", pa.string()),
        pa.field("tags", pa.list_(pa.field("element", pa.string())), nullable=False),  # Parquet's list item name
        pa.field("metadata", pa.string(), nullable=False, metadata=_JSON),
        pa.field("status", pa.string(), nullable=False),
        pa.field("decision", pa.string()),
        pa.field("reasons", pa.string(), nullable=False, metadata=_JSON),
        pa.field("image_uri", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("scores", pa.string(), nullable=False, metadata=_JSON),
        pa.field("error", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

RECORD_FIELDS: tuple[str, ...] = tuple(RESULTS_SCHEMA.names)
_JSON_COLUMNS = tuple(f.name for f in RESULTS_SCHEMA if f.metadata == _JSON)


def item_to_record(item: Item, created_at: datetime) -> dict[str, Any]:
    """The public JSON record of an item: nested fields as objects, ``created_at`` as ISO 8601 UTC."""
    record = {name: getattr(item, name) for name in RECORD_FIELDS if name != "created_at"}
    record["created_at"] = created_at.astimezone(UTC).isoformat()
    return record


def _parquet_row(item: Item, created_at: datetime) -> dict[str, Any]:
    row = {name: getattr(item, name) for name in RECORD_FIELDS if name != "created_at"}
    for name in _JSON_COLUMNS:
        row[name] = json.dumps(row[name], sort_keys=True, ensure_ascii=False, default=json_default)
    row["tags"] = [str(t) for t in row["tags"]]
    row["created_at"] = created_at
    return row


def write_results_parquet(store: AuditStore, job: str, fileobj_or_path: str | IO[bytes], batch: int = 1000) -> int:
    """Write every record of ``job`` (ordered by ``item_id``) to a Parquet file; returns the row count.

    Streams ``batch`` records at a time from the store into one row group each, so memory stays flat in
    job size. A job with no records gives a valid file with the schema and no rows.
    """
    written = 0
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(fileobj_or_path, RESULTS_SCHEMA, compression="zstd") as writer:
        for item, created_at in store.iter_records(job, batch=batch):
            rows.append(_parquet_row(item, created_at))
            if len(rows) == batch:
                writer.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
                written += len(rows)
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA))
            written += len(rows)
    return written
