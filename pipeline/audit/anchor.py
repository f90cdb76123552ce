"""Chain anchors: the chain head written outside the database, next to a job's images, at job end.

Whoever can rewrite the database can rewrite the whole chain consistently from some event on, or cut its
tail; an anchor kept elsewhere (the job's output prefix, ideally write-once object storage) is what
catches that: ``genpipe audit verify --anchor URL`` checks that the anchored (seq, hash) is still in the chain.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pipeline.audit.chain import canonical_json
from pipeline.errors import GenpipeError
from pipeline.storage import Storage, open_input

ANCHOR_KEY = "chain_head.json"
ANCHOR_FORMAT = "genpipe-chain-anchor/1"


class AnchorError(GenpipeError):
    """An anchor file that cannot be read at all."""


def write_chain_anchor(store: Any, job_root: Storage | str, job: str) -> dict[str, Any]:
    """Write ``chain_head.json`` (head seq and hash, job, database, time) atomically at the job root (a
    ``Storage`` or its URL) — next to ``images/`` — and return what was written. Call it after the job's
    last audit write (after ``end_run``), so the anchor covers the whole run."""
    storage = job_root if isinstance(job_root, Storage) else Storage(job_root)
    head = store.chain_head()
    if head is None:
        raise AnchorError(f"audit DB {store.safe_url} has no events to anchor")
    anchor = {
        "format": ANCHOR_FORMAT,
        "job": job,
        "seq": head[0],
        "hash": head[1],
        "row_times_from_seq": store.row_times_from_seq(),  # moving it later would exempt rows from verify
        "database": store.safe_url,
        "written_at": datetime.now(UTC).isoformat(),
    }
    storage.write_atomic(ANCHOR_KEY, (canonical_json(anchor) + "\n").encode())
    return anchor


def read_anchor(url: str) -> dict[str, Any]:
    """The anchor at ``url`` (a path or fsspec URL; a job root works too). Raises ``AnchorError`` when it
    cannot be read; content is returned as found, for ``verify`` to judge."""
    if not url.endswith(".json"):
        url = url.rstrip("/") + "/" + ANCHOR_KEY
    try:
        with open_input(url) as f:
            return json.load(f)
    except FileNotFoundError:
        raise AnchorError(f"anchor {url}: no such file") from None
    except (OSError, ValueError) as exc:
        raise AnchorError(f"anchor {url}: cannot be read: {exc}") from None
