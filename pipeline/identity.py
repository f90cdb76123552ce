"""Deterministic identities: ``item_id`` and derived seeds.

``item_id`` is a pure function of the job name, the prompt id, the sample index and the generation
parameters, so a rerun finds the same ids and skips what is done. A seed is data: taken from the row
(sample k of a row with seed s uses s + k) or derived from the item id, and always recorded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from schemas.limits import LIMITS


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def item_id(job: str, prompt_id: str, sample_index: int, params: dict[str, Any]) -> str:
    """32 hex characters identifying one image to generate."""
    return _digest({"job": job, "prompt_id": prompt_id, "sample_index": sample_index, "params": params})[:32]


def rejected_item_id(job: str, row_number: int, sample_index: int) -> str:
    """Id of a rejected row's record. Rows that failed validation have no trustworthy prompt id (it may be
    missing, unsafe or a duplicate), so the id comes from the row's position in the manifest."""
    return _digest({"job": job, "rejected_row": row_number, "sample_index": sample_index})[:32]


def derived_seed(item: str, attempt: int = 1) -> int:
    """A seed in [0, 2**63) from an item id; later attempts (regenerate-on-flag) get new seeds."""
    h = hashlib.sha256(f"seed:{item}:{attempt}".encode()).digest()
    return int.from_bytes(h[:8], "big") & LIMITS.max_seed
