"""Checks of DESIGN.md's invariants by reading the audit database and the storage, shared by run tests."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image

from pipeline.audit import AuditStore
from pipeline.stages.write import image_key
from pipeline.storage import TMP_PREFIX, Storage
from schemas.record import TERMINAL_STATUSES


def check_invariants(db_url: str, job_root: str, job: str, expected_items: int) -> dict[str, int]:
    """I1 one terminal record per item; I2 every image has exactly one record and matches its sha256;
    I3 no temporary objects, every image decodes; I4 no duplicates. Returns counts by status."""
    store = AuditStore(db_url)
    try:
        items = list(store.iter_items(job))
    finally:
        store.dispose()
    ids = [it.item_id for it in items]
    assert len(ids) == len(set(ids)) == expected_items, (len(ids), len(set(ids)), expected_items)  # I1, I4
    assert all(it.status in TERMINAL_STATUSES for it in items), Counter(it.status for it in items)
    storage = Storage(job_root)
    objects = list(storage.walk())
    assert not [o for o in objects if o.rsplit("/", 1)[-1].startswith(TMP_PREFIX)], objects  # I3
    assert not [o for o in objects if o.startswith("_plan")], objects
    images = sorted(o for o in objects if o.startswith("images/"))
    generated = [it for it in items if it.status == "generated"]
    assert sorted(image_key(it) for it in generated) == images  # I2: one record per image, one image per record
    for it in generated:
        data = storage.read(image_key(it))
        assert hashlib.sha256(data).hexdigest() == it.image_sha256
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.size == (it.width, it.height)
    results = pq.read_table(io.BytesIO(storage.read("results.parquet")))
    assert sorted(results.column("item_id").to_pylist()) == sorted(ids)
    return dict(Counter(it.status for it in items))
