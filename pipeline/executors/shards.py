"""Plan shards: the pending items of a run, as Arrow IPC files with one record batch per generator batch.

The planner writes them (``write_shard``); the local executor reads them in order (``iter_batches``) and the Ray
executor hands out (shard, batch index) pairs and reads one batch per work unit (``read_batch``). Arrow IPC
rather than Parquet because the unit is the batch: a Parquet row group of 4–8 rows pays ~34 columns of metadata
each, and reading one means parsing the whole footer (measured on 1,024 items: 238 ms to write and 11.6 ms per
batch to read as Parquet, against 22 ms and 0.2 ms as IPC; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import pyarrow as pa

from pipeline.storage import Storage
from schemas.record import TRANSPORT_SCHEMA, Item, items_from_table

SHARD_SUFFIX = ".arrow"


def write_shard(f: BinaryIO, items: list[Item], batch_size: int) -> None:
    """``items`` in order, ``batch_size`` to a record batch (the last may be shorter)."""
    with pa.ipc.new_file(f, TRANSPORT_SCHEMA) as writer:
        for start in range(0, len(items), batch_size):
            rows = [it.to_row() for it in items[start : start + batch_size]]
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=TRANSPORT_SCHEMA))


def shard_batches(storage: Storage, key: str) -> int:
    with storage.fs.open(storage.path(key), "rb") as f:
        return pa.ipc.open_file(f).num_record_batches


def shard_rows(storage: Storage, key: str) -> int:
    with storage.fs.open(storage.path(key), "rb") as f:
        reader = pa.ipc.open_file(f)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def read_batch(storage: Storage, key: str, index: int) -> pa.Table:
    with storage.fs.open(storage.path(key), "rb") as f:
        return pa.Table.from_batches([pa.ipc.open_file(f).get_batch(index)])


def iter_batches(storage: Storage, keys: list[str]) -> Iterator[list[Item]]:
    """Every batch of every shard in ``keys``, in order, as items."""
    for key in keys:
        with storage.fs.open(storage.path(key), "rb") as f:
            reader = pa.ipc.open_file(f)
            for i in range(reader.num_record_batches):
                yield items_from_table(pa.Table.from_batches([reader.get_batch(i)]))
