"""The one record that flows through every stage: an item (manifest row x sample) and what happened to it.

Stages take and return lists of ``Item``. Typed fields hold everything the audit log needs; pass-through
manifest columns go to ``metadata``. ``pixels`` is the generated image in memory between the generator
and the writer and is never persisted.

On Ray Data the record crosses process boundaries as a flat Arrow row (``to_row`` / ``from_row``): nested
fields travel as JSON text so every batch has one fixed schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import pyarrow as pa

Status = Literal["pending", "generated", "rejected", "blocked", "failed", "superseded"]
TERMINAL_STATUSES: tuple[str, ...] = ("generated", "rejected", "blocked", "failed")
#: A ``rejected`` record whose manifest position a later run planned again (the row was fixed, or another row
#: stands there now): kept for the audit trail, no longer one of the job's items.
SUPERSEDED = "superseded"


@dataclass
class Item:
    item_id: str
    job: str
    prompt_id: str
    sample_index: int
    row_number: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    seed_source: Literal["row", "derived"] | None = None
    model: str = ""
    model_revision: str | None = None
    lora: list[dict[str, Any]] = field(default_factory=list)
    sampler: str = ""
    steps: int = 0
    guidance_scale: float = 0.0
    width: int = 0
    height: int = 0
    format: str = "png"
    campaign: str | None = None
    sku: str | None = None
    locale: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    status: Status = "pending"
    decision: Literal["pass", "review", "block"] | None = None
    reasons: list[dict[str, Any]] = field(default_factory=list)
    image_uri: str | None = None
    image_sha256: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    attempt: int = 1
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)

    def param_key(self) -> tuple:
        """Items with equal keys can share one pipeline call."""
        return (
            self.model,
            self.model_revision,
            json.dumps(self.lora, sort_keys=True),
            self.sampler,
            self.steps,
            self.guidance_scale,
            self.width,
            self.height,
            bool(self.negative_prompt),  # last: SDXL treats no negative prompt unlike "" (see DiffusersGenerator)
        )

    def reject(self, code: str, message: str, **detail: Any) -> Item:
        self.status = "rejected"
        self.reasons.append({"code": code, "message": message, **detail})
        return self

    def supersede(self, message: str) -> Item:
        self.status = SUPERSEDED
        self.reasons.append({"code": "superseded", "message": message})
        return self

    def fail(self, exc: BaseException, stage: str) -> Item:
        self.status = "failed"
        self.error = f"{type(exc).__name__}: {exc}"[:2000]
        self.reasons.append({"code": "failed", "stage": stage, "exception": type(exc).__name__})
        self.pixels = None
        return self

    # --- transport (Ray Data) -------------------------------------------------------------------
    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pixels"}
        for name in _JSON_FIELDS:
            row[name] = json.dumps(row[name], sort_keys=True, default=str)
        if self.pixels is not None:
            row["pixels"] = np.ascontiguousarray(self.pixels, dtype=np.uint8).tobytes()
            row["pixels_shape"] = list(self.pixels.shape)
        else:
            row["pixels"] = None
            row["pixels_shape"] = None
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Item:
        data = {k: v for k, v in row.items() if k in _FIELD_NAMES and k != "pixels"}
        for name in _JSON_FIELDS:
            if isinstance(data.get(name), str):
                data[name] = json.loads(data[name])
        item = cls(**data)
        if row.get("pixels") is not None:
            item.pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pixels_shape"]).copy()
        return item

    def as_dict(self) -> dict[str, Any]:
        """All persisted fields, nested ones as Python objects."""
        d = asdict(self)
        d.pop("pixels")
        return d


_FIELD_NAMES = {f.name for f in fields(Item)}
_JSON_FIELDS = ("lora", "tags", "metadata", "reasons", "scores", "timings")

#: The Arrow schema of ``Item.to_row`` — fixed, so Ray Data never has to infer types from a batch.
TRANSPORT_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("job", pa.string()),
        ("prompt_id", pa.string()),
        ("sample_index", pa.int64()),
        ("row_number", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("seed_source", pa.string()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("lora", pa.string()),
        ("sampler", pa.string()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("campaign", pa.string()),
        ("sku", pa.string()),
        ("locale", pa.string()),
        ("tags", pa.string()),
        ("metadata", pa.string()),
        ("status", pa.string()),
        ("decision", pa.string()),
        ("reasons", pa.string()),
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("scores", pa.string()),
        ("timings", pa.string()),
        ("error", pa.string()),
        ("attempt", pa.int64()),
        ("pixels", pa.binary()),
        ("pixels_shape", pa.list_(pa.int64())),
    ]
)


def items_to_table(items: list[Item]) -> pa.Table:
    return pa.Table.from_pylist([it.to_row() for it in items], schema=TRANSPORT_SCHEMA)


def items_from_table(table: pa.Table) -> list[Item]:
    return [Item.from_row(r) for r in table.to_pylist()]
