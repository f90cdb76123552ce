"""Checks of DESIGN.md's invariants by reading the audit database and the storage, shared by run tests."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import pyarrow.parquet as pq
from PIL import Image

from pipeline.audit import AuditStore, verify
from pipeline.stages.write import image_key
from pipeline.storage import TMP_PREFIX, Storage
from schemas.record import SUPERSEDED, TERMINAL_STATUSES


def check_invariants(db_url: str, job_root: str, job: str, expected_items: int) -> dict[str, int]:
    """I1 one terminal record per item; I2 every image has exactly one record and matches its sha256;
    I3 no temporary objects, every image decodes; I4 no duplicates. Returns counts by status."""
    store = AuditStore(db_url)
    try:
        items = list(store.iter_items(job))
        report = verify(store, images=True)
        assert report.ok, report.render()  # I5: the audit chain verifies, and every image its sha256
    finally:
        store.dispose()
    ids = [it.item_id for it in items]
    assert len(ids) == len(set(ids)), "duplicate records"  # I4
    # A fixed row's earlier `rejected` records, and a row's records from before its settings changed, are history,
    # not items of the job: superseded, their images (if any) under superseded/.
    current = [it for it in items if it.status != SUPERSEDED]
    assert all(it.reasons[-1]["code"] == "superseded" for it in items if it not in current)
    firsts = [it for it in current if it.attempt == 1]  # regenerate-on-flag adds one record per extra try
    assert len(firsts) == expected_items, (len(firsts), expected_items)  # I1
    assert all(it.status in TERMINAL_STATUSES for it in current), Counter(it.status for it in items)
    storage = Storage(job_root)
    objects = list(storage.walk())
    assert not [o for o in objects if o.rsplit("/", 1)[-1].startswith(TMP_PREFIX)], objects  # I3
    assert not [o for o in objects if o.startswith("_plan")], objects
    prefixes = ("images/", "review/", "quarantine/", "superseded/")
    images = sorted(o for o in objects if o.startswith(prefixes) and not o.startswith("quarantine/orphans/"))
    stored = [it for it in items if it.image_sha256]
    assert all(it.status in ("generated", "blocked", SUPERSEDED) for it in stored)
    assert sorted(image_key(it) for it in stored) == images  # I2: one record per image, one image per record
    public = [it for it in stored if image_key(it).startswith("images/")]
    assert all(it.decision in (None, "pass") for it in public)  # nothing flagged under the public prefix
    for it in stored:
        data = storage.read(image_key(it))
        assert hashlib.sha256(data).hexdigest() == it.image_sha256
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.size == (it.width, it.height)
    results = pq.read_table(io.BytesIO(storage.read("results.parquet")))
    assert sorted(results.column("item_id").to_pylist()) == sorted(ids)
    return dict(Counter(it.status for it in items))
